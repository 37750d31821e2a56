"""Other frameworks' model files: Caffe's ``.caffemodel`` (bvlc_alexnet) into our two towers."""
