/* connrate: new TCP connections per second, the tool behind the bench's "conn/s" column.
 *
 *   connrate server PORT              accept loop on 0.0.0.0:PORT: read 1 byte, write 1
 *                                     byte, close (the server closes first, as HTTP/1.0
 *                                     does, so TIME_WAIT lands on the server side and the
 *                                     client's ephemeral ports are free again at once)
 *   connrate client IP PORT SECONDS   connect, send 1 byte, read 1 byte, read EOF, close,
 *                                     in a loop for SECONDS; prints one JSON object
 *
 * Compiled at bench time into bench/build/ by bench/tools.py (bench/build is git-ignored).
 * The client is single-threaded and sequential: it measures the cost of one connection
 * set-up and tear-down end to end, not how many a server can take in parallel.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (4u * 1024u * 1024u)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set_timeouts(int fd, int seconds) {
    struct timeval tv = {.tv_sec = seconds, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int serve(int port) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_ANY)};
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
        fprintf(stderr, "connrate server: port %d: %s\n", port, strerror(errno));
        return 1;
    }
    for (;;) {
        int c = accept(ls, NULL, NULL);
        char b;
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            fprintf(stderr, "connrate server: accept: %s\n", strerror(errno));
            return 1;
        }
        set_timeouts(c, 2);  /* a peer that never sends must not stall the loop */
        if (read(c, &b, 1) == 1) {
            ssize_t w = write(c, &b, 1);
            (void)w;
        }
        close(c);
    }
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double pct(const double *v, size_t n, double p) {
    if (!n) return 0;
    size_t i = (size_t)(p / 100.0 * (n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static int client(const char *ip, int port, double seconds) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    double *lat = malloc(MAX_SAMPLES * sizeof *lat);
    size_t ok = 0, errors = 0;
    int first_errno = 0;
    const char *first_stage = "";
    if (!lat || inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "connrate client: bad address %s\n", ip);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    double start = now(), end = start + seconds, t;
    while ((t = now()) < end) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        char b = 'x';
        const char *stage = "socket";
        if (fd < 0) goto fail;
        set_timeouts(fd, 2);
        stage = "connect";
        if (connect(fd, (struct sockaddr *)&a, sizeof a)) goto fail;
        stage = "write";
        if (write(fd, &b, 1) != 1) goto fail;
        stage = "read";
        if (read(fd, &b, 1) != 1) goto fail;
        stage = "eof";
        if (read(fd, &b, 1) != 0) goto fail;
        close(fd);
        if (ok < MAX_SAMPLES) lat[ok] = now() - t;
        ok++;
        continue;
    fail:
        if (!errors) { first_errno = errno; first_stage = stage; }
        errors++;
        if (fd >= 0) close(fd);
        usleep(1000);  /* a refused or broken path must not turn into a hot loop */
    }
    double took = now() - start;
    size_t n = ok < MAX_SAMPLES ? ok : MAX_SAMPLES;
    qsort(lat, n, sizeof *lat, cmp_double);
    printf("{\"tool\": \"c\", \"ok\": %zu, \"errors\": %zu, \"seconds\": %.3f, \"rate\": %.1f, "
           "\"lat_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f}, "
           "\"first_error\": \"%s%s%s\"}\n",
           ok, errors, took, ok / took, pct(lat, n, 50) * 1e6, pct(lat, n, 90) * 1e6,
           pct(lat, n, 99) * 1e6, first_stage, errors ? ": " : "",
           errors ? strerror(first_errno) : "");
    free(lat);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server")) return serve(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: connrate server PORT | connrate client IP PORT SECONDS\n");
    return 64;
}
