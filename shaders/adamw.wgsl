// adamw.wgsl: being written.
