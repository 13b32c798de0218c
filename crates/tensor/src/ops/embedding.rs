//! embedding: being written.
