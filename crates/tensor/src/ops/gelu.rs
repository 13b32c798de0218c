//! gelu: being written.
