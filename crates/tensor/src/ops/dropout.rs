//! dropout: being written.
