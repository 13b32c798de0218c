// embedding.wgsl: being written.
