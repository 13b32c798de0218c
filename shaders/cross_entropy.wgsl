// cross_entropy.wgsl: being written.
