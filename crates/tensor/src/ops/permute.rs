//! permute: being written.
