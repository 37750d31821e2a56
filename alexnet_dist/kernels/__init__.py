"""Small CPU kernels in C (``csrc/``), built when the package is installed and loaded with ctypes:
fused ReLU+LRN, overlapping max-pooling, crop-only JPEG decoding. Each has a torch or
Python path that gives the same numbers where its library is missing."""
