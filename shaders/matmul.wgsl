// matmul.wgsl: being written.
