"""meshcore: the leaf package of meshlane.

Owns the constants (ports, marks, map names, exit codes), the resource and identity
models and the error tree. It performs no I/O and imports nothing else from meshlane;
every other package (fastpath, slowpath, cni_plugin, meshlane) imports from here.
"""
