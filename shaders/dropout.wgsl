// dropout.wgsl: being written.
