// layernorm.wgsl: being written.
