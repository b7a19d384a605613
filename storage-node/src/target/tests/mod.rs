//! Target tests.
