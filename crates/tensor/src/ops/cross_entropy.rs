//! cross_entropy: being written.
