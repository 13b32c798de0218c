//! softmax: being written.
