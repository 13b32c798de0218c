//! adamw: being written.
