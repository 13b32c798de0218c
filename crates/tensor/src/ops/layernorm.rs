//! layernorm: being written.
