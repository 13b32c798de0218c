// reduce.wgsl: being written.
