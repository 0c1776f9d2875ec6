//! A configuration problem: the dotted key it is about, and what to do about it.
//!
//! A leaf: it imports nothing from the crate. Every component validates its own config
//! section and reports what it finds as [`Problem`]s; [`crate::config`] collects them from
//! every section (and adds the checks that span sections) so that one run of `check-config`
//! or `run` lists them all.

use std::fmt;

/// One configuration problem: where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `cloud.ca_file`.
    pub key: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A problem with `key`: `message` says what is wrong and what to do about it.
pub fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}
