//! Validated identifiers that travel on the wire: [`CommitId`], [`JobId`], [`RunnerId`].
//!
//! A `CommitId` is the only value in tinyci that ever becomes part of a file name, so its
//! constructor is the single gate: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits, nothing
//! else. Decoding goes through the same gate (`serde(try_from)`), so a hostile id such as
//! `../../etc/x` cannot exist past the decoder.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not a commit id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid commit id {shown:?}: expected 40 or 64 lowercase hex digits")]
pub struct InvalidCommitId {
    /// The offending input, cut to a printable length.
    shown: String,
}

/// A git object id of a commit: 40 or 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitId(String);

impl CommitId {
    /// Validates `s` as a commit id.
    pub fn parse(s: &str) -> Result<Self, InvalidCommitId> {
        let ok = matches!(s.len(), 40 | 64)
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(CommitId(s.to_owned()))
        } else {
            Err(InvalidCommitId {
                shown: s.chars().take(80).collect(),
            })
        }
    }

    /// The id as hex text (safe to use as a file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 10 digits, for log lines meant for people.
    pub fn short(&self) -> &str {
        &self.0[..10]
    }
}

impl TryFrom<String> for CommitId {
    type Error = InvalidCommitId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CommitId::parse(&s)
    }
}

impl From<CommitId> for String {
    fn from(c: CommitId) -> String {
        c.0
    }
}

impl FromStr for CommitId {
    type Err = InvalidCommitId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CommitId::parse(s)
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.0)
    }
}

/// One attempt at running one commit on one runner. A retry gets a new `JobId`; the
/// dispatcher accepts log chunks and results only for the attempt it has outstanding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh random id.
    pub fn new() -> Self {
        JobId(Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// The dispatcher's name for one registration of a runner (a nonce per connection, so a
/// runner that reconnects is a new `RunnerId` even on the same address).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunnerId(pub u64);

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Debug for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunnerId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sha1_and_sha256() {
        let a = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(CommitId::parse(a).unwrap().as_str(), a);
        let b = "a".repeat(64);
        assert!(CommitId::parse(&b).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "abc",
            "../../etc/passwd",
            "0123456789ABCDEF0123456789abcdef01234567",
            "0123456789abcdef0123456789abcdef0123456",
            "0123456789abcdef0123456789abcdef012345678",
            "0123456789abcdef0123456789abcdef0123456/",
            "g123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(CommitId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
