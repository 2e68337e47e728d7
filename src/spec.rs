//! The steps of a run: read from `.tinyci.toml` at the root of the commit under test, or the
//! reference behaviour (the unittest suite in `tests/`) when the file is absent.

use std::time::Duration;

use serde::Deserialize;

use crate::git::RootFile;

/// The file a repository declares its steps in.
pub const SPEC_FILE: &str = ".tinyci.toml";

/// A step's timeout when the file gives none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The command run when a repository has `tests/` but no `.tinyci.toml`.
pub const DEFAULT_TEST_COMMAND: &str = "python3 -m unittest discover -s tests -v";

/// The steps of one run, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// At least one step.
    pub steps: Vec<Step>,
}

/// One step: a shell command with a name and a timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Short name, used as the output prefix `[name]`.
    pub name: String,
    /// Run with `sh -e -c` in the checkout (a multi-line script stops at its first failing
    /// command).
    pub run: String,
    /// The whole process group is killed past this.
    pub timeout: Duration,
}

/// Why a commit's steps cannot be determined.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither `.tinyci.toml` nor `tests/` exists.
    #[error("nothing to run: the commit has no {SPEC_FILE} and no tests/ directory")]
    NothingToRun,
    /// The file is not valid TOML of the expected shape.
    #[error("malformed {SPEC_FILE}: {0}")]
    Malformed(String),
    /// The file parsed but says something impossible.
    #[error("invalid {SPEC_FILE}: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
    timeout: Option<String>,
}

/// The largest `.tinyci.toml` we read; anything bigger is not a step list.
pub const MAX_SPEC_BYTES: u64 = 256 * 1024;

/// The steps of a commit, from what its tree has at the root: the spec file (read from the
/// object database, see [`crate::git::read_root_file`]) and whether there is a `tests/`
/// directory for the reference behaviour.
pub fn from_tree(file: RootFile, has_tests_dir: bool) -> Result<Spec, SpecError> {
    match file {
        RootFile::Bytes(bytes) => {
            let text = String::from_utf8(bytes)
                .map_err(|_| SpecError::Malformed("it is not UTF-8 text".into()))?;
            parse(&text)
        }
        RootFile::TooLarge(size) => Err(SpecError::Invalid(format!(
            "{size} bytes is larger than the {MAX_SPEC_BYTES}-byte limit"
        ))),
        RootFile::Symlink => Err(SpecError::Invalid(
            "it is a symbolic link; tinyci reads the file from the commit and does not follow links"
                .into(),
        )),
        RootFile::NotAFile => Err(SpecError::Invalid("it is not a regular file".into())),
        RootFile::Missing if has_tests_dir => Ok(Spec {
            steps: vec![Step {
                name: "test".into(),
                run: DEFAULT_TEST_COMMAND.into(),
                timeout: DEFAULT_STEP_TIMEOUT,
            }],
        }),
        RootFile::Missing => Err(SpecError::NothingToRun),
    }
}

/// Parses and validates the text of a `.tinyci.toml`.
pub fn parse(text: &str) -> Result<Spec, SpecError> {
    let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Malformed(e.to_string()))?;
    if raw.steps.is_empty() {
        return Err(SpecError::Invalid("no [[steps]]".into()));
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    for s in raw.steps {
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(SpecError::Invalid(format!(
                "step name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                s.name
            )));
        }
        if steps.iter().any(|t: &Step| t.name == s.name) {
            return Err(SpecError::Invalid(format!(
                "step name {:?} used twice",
                s.name
            )));
        }
        if s.run.trim().is_empty() {
            return Err(SpecError::Invalid(format!(
                "step {:?} has an empty run",
                s.name
            )));
        }
        let timeout = match s.timeout {
            None => DEFAULT_STEP_TIMEOUT,
            Some(t) => match humantime::parse_duration(&t) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    return Err(SpecError::Invalid(format!(
                        "step {:?}: timeout must be positive",
                        s.name
                    )))
                }
                Err(e) => {
                    return Err(SpecError::Invalid(format!(
                        "step {:?}: timeout {t:?}: {e}",
                        s.name
                    )))
                }
            },
        };
        steps.push(Step {
            name: s.name,
            run: s.run,
            timeout,
        });
    }
    Ok(Spec { steps })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_in_order_with_timeouts() {
        let spec = parse(
            r#"
            [[steps]]
            name = "lint"
            run = "true"
            [[steps]]
            name = "test"
            run = "python3 -m unittest"
            timeout = "90s"
            "#,
        )
        .unwrap();
        assert_eq!(spec.steps.len(), 2);
        assert_eq!(spec.steps[0].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(spec.steps[1].name, "test");
        assert_eq!(spec.steps[1].timeout, Duration::from_secs(90));
    }

    #[test]
    fn malformed_and_invalid_files_say_why() {
        let cases = [
            ("steps = 3", "malformed"),
            ("[[steps]]\nname = \"a\"", "malformed"),
            ("[[steps]]\nname=\"a\"\nrun=\"x\"\nextra=1", "malformed"),
            ("steps = []", "no [[steps]]"),
            ("[[steps]]\nname=\"../x\"\nrun=\"x\"", "step name"),
            (
                "[[steps]]\nname=\"a\"\nrun=\"x\"\n[[steps]]\nname=\"a\"\nrun=\"y\"",
                "twice",
            ),
            ("[[steps]]\nname=\"a\"\nrun=\" \"", "empty run"),
            (
                "[[steps]]\nname=\"a\"\nrun=\"x\"\ntimeout=\"soon\"",
                "timeout",
            ),
            (
                "[[steps]]\nname=\"a\"\nrun=\"x\"\ntimeout=\"0s\"",
                "positive",
            ),
            ("\u{0}\u{1}garbage[[", "malformed"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn falls_back_to_tests_dir_or_says_nothing_to_run() {
        assert!(matches!(
            from_tree(RootFile::Missing, false),
            Err(SpecError::NothingToRun)
        ));
        let spec = from_tree(RootFile::Missing, true).unwrap();
        assert_eq!(spec.steps[0].run, DEFAULT_TEST_COMMAND);
        for (file, want) in [
            (RootFile::Symlink, "symbolic link"),
            (RootFile::TooLarge(MAX_SPEC_BYTES + 1), "limit"),
            (RootFile::NotAFile, "not a regular file"),
            (RootFile::Bytes(vec![0xff, 0xfe]), "UTF-8"),
        ] {
            let e = from_tree(file, true).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
