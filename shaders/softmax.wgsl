// softmax.wgsl: being written.
