// gelu.wgsl: being written.
