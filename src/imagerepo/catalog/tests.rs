//! Unit tests of the catalog rules.
