// permute.wgsl: being written.
