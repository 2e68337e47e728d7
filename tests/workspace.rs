//! The runner's workspace against the real binaries (issue 8): the clone a step sees is a
//! real git checkout of its commit — from a local path, `file://`, `git://`, dumb `http://`
//! and `ssh://` origins — whatever the previous step left in it; a hanging origin ends the
//! job attempt with an infrastructure reason (handed back, never a verdict) and never stops
//! SIGTERM; what is not a clean work-tree top is refused at start; one process per clone.
//!
//! Most checks run inside a step (`ci/git_check.sh`, committed with the test's commits), so
//! they see exactly what a user's step would see.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use testkit::origins::{FakeSsh, GitDaemon, HangingServer, HttpServer};
use testkit::*;

fn bins() -> Bins {
    testkit::bins!()
}

/// Run inside a step: fails (exit 1, with a line saying why) unless git works in the
/// checkout as on a fresh clone of `$TINYCI_COMMIT`.
const GIT_CHECK: &str = r#"set -u
fail() { echo "GIT-CHECK-FAILED: $*"; exit 1; }
head=$(git rev-parse HEAD) || fail "git rev-parse HEAD"
[ "$head" = "$TINYCI_COMMIT" ] || fail "HEAD is $head, TINYCI_COMMIT is $TINYCI_COMMIT"
top=$(git rev-parse --show-toplevel) || fail "git rev-parse --show-toplevel"
[ "$top" = "$(pwd -P)" ] || fail "the work tree top is $top, the step runs in $(pwd -P)"
if git symbolic-ref -q HEAD; then fail "HEAD is on a branch, not detached"; fi
st=$(git status --porcelain --ignored) || fail "git status"
[ -z "$st" ] || { echo "$st"; fail "git status --porcelain --ignored is not empty"; }
git describe --always >/dev/null || fail "git describe --always"
git log --oneline >/dev/null || fail "git log"
git diff --quiet HEAD || { git diff --stat HEAD; fail "git diff --quiet HEAD"; }
git diff --quiet --cached HEAD || fail "the index differs from HEAD"
git fsck --connectivity-only --no-dangling >/dev/null 2>&1 || { git fsck --connectivity-only --no-dangling; fail "git fsck: objects missing"; }
[ "$(git rev-parse --is-shallow-repository)" = false ] || fail "the clone is shallow"
[ -z "$(git replace -l)" ] || fail "objects are replaced: $(git replace -l)"
[ ! -e "$(git rev-parse --git-path BISECT_LOG)" ] || fail "a bisect is under way"
bad=$(git ls-files -z | xargs -0 -r dirname -z | sort -zu | xargs -0 -r stat -c '%a %n' | grep -v '^7')
[ -z "$bad" ] || fail "tracked directories the owner cannot use (mode, name): $bad"
echo "GIT-CHECK-OK $(git describe --always) $(git rev-list --count HEAD) commits"
"#;

/// A `.tinyci.toml` whose only step is the git check.
fn check_spec() -> String {
    spec(&[("git", "sh ci/git_check.sh", "60s")])
}

/// Files for a commit whose step is the git check.
fn check_files() -> Vec<(&'static str, String)> {
    vec![
        (".tinyci.toml", check_spec()),
        ("ci/git_check.sh", GIT_CHECK.to_string()),
    ]
}

/// Commits `files` (plus the git check, unless `files` brings its own spec) to the master.
fn commit(c: &Cluster, message: &str, files: &[(&str, &str)]) -> Result<String> {
    let check = check_files();
    let mut all: Vec<(&str, &str)> = check.iter().map(|(p, b)| (*p, b.as_str())).collect();
    for (p, b) in files {
        all.retain(|(q, _)| q != p);
        all.push((p, b));
    }
    c.commit(message, &all)
}

/// Waits for `sha`'s result and fails, with its log and every process log, unless it is
/// `success`.
fn expect_success(c: &Cluster, sha: &str) -> Result<Value> {
    let r = c.wait_result(sha, WAIT)?;
    if r["status"] != "success" {
        // The log may trail the result by a moment.
        let _ = wait_until("the run's log", Duration::from_secs(2), || {
            !c.log_text(sha).is_empty()
        });
    }
    ensure!(
        r["status"] == "success",
        "{sha} is not success: {r}\n--- its log:\n{}\n--- runner logs:\n{}",
        c.log_text(sha),
        c.runners
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    Ok(r)
}

/// Writes `files` (raw byte paths) into the master and commits everything.
fn commit_raw(c: &Cluster, message: &str, files: &[(&[u8], &[u8])]) -> Result<String> {
    for (path, body) in files {
        let p = c.master.dir.join(OsStr::from_bytes(path));
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, body)?;
    }
    git(&c.master.dir, &["add", "-A"])?;
    git(&c.master.dir, &["commit", "-qm", message])?;
    c.master.head()
}

/// Cluster options: no runner, no observer (the test adds them).
fn bare_opts() -> Opts {
    Opts {
        runners: 0,
        observer: false,
        ..Opts::default()
    }
}

/// Lines of `log` that speak of cloning, not counting mentions of the clone's path.
fn clone_lines(log: &str, clone: &Path) -> usize {
    let path = clone.display().to_string();
    log.lines()
        .filter(|l| l.replace(&path, "").to_lowercase().contains("clon"))
        .count()
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

/// Whether `log` names `path` (as given or canonical).
fn names_path(log: &str, path: &Path) -> bool {
    log.contains(&path.display().to_string())
        || log.contains(&canonical(path).display().to_string())
}

// ---------------------------------------------------------------------------------------
// git in steps, per origin

/// The observer reports the tip; two commits with the git check follow, each must pass.
fn git_check_two_commits(c: &Cluster) -> Result<()> {
    c.wait_result(&c.master.head()?, WAIT)?;
    let a = commit(c, "git check one", &[("one.txt", "1\n")])?;
    expect_success(c, &a)?;
    let b = commit(
        c,
        "git check two",
        &[("one.txt", "2\n"), ("two/t.txt", "t\n")],
    )?;
    expect_success(c, &b)?;
    Ok(())
}

#[test]
fn git_works_in_steps_with_a_local_path_origin() -> Result<()> {
    let c = Cluster::start(bins(), Opts::default())?;
    git_check_two_commits(&c)
}

#[test]
fn git_works_in_steps_with_a_file_url_origin() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let url = format!("file://{}", c.master.dir.display());
    let setup = CloneSetup {
        clone_from: Some(url.clone()),
        ..CloneSetup::default()
    };
    c.add_runner_with(&setup)?;
    c.start_observer_with(&CloneSetup {
        origin: Some(url),
        ..CloneSetup::default()
    })?;
    git_check_two_commits(&c)
}

#[test]
fn git_works_in_steps_with_a_git_daemon_origin() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let daemon = GitDaemon::start(c.tmp.path())?;
    let url = daemon.url("master");
    c.add_runner_with(&CloneSetup {
        clone_from: Some(url.clone()),
        ..CloneSetup::default()
    })?;
    c.start_observer_with(&CloneSetup {
        origin: Some(url),
        ..CloneSetup::default()
    })?;
    git_check_two_commits(&c).with_context(|| format!("git daemon log:\n{}", daemon.log()))
}

#[test]
fn git_works_in_steps_with_a_dumb_http_origin() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    // The dumb protocol reads info/refs and objects/info/packs: keep them current.
    let hook = c.master.dir.join(".git/hooks/post-commit");
    std::fs::write(&hook, "#!/bin/sh\nexec git update-server-info\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
    }
    git(&c.master.dir, &["update-server-info"])?;
    let http = HttpServer::start(c.tmp.path())?;
    let url = http.url("master/.git");
    c.add_runner_with(&CloneSetup {
        clone_from: Some(url.clone()),
        ..CloneSetup::default()
    })?;
    c.start_observer_with(&CloneSetup {
        origin: Some(url),
        ..CloneSetup::default()
    })?;
    let before = http.requests();
    git_check_two_commits(&c)?;
    ensure!(http.requests() > before, "nobody fetched over http");
    Ok(())
}

#[test]
fn git_works_in_steps_with_an_ssh_origin_through_git_ssh_command() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let ssh = FakeSsh::install(&c.tmp.path().join("ssh"))?;
    let master = c.master.dir.display().to_string();
    // The runner uses the ssh:// form, the observer the scp-like user@host:path form.
    c.add_runner_with(&CloneSetup {
        clone_from: Some(format!("ssh://localhost{master}")),
        env: ssh.env(),
        ..CloneSetup::default()
    })?;
    c.start_observer_with(&CloneSetup {
        origin: Some(format!("tinyci@localhost:{master}")),
        env: ssh.env(),
        ..CloneSetup::default()
    })?;
    let calls_before = ssh.calls().len();
    git_check_two_commits(&c)?;
    let calls = ssh.calls();
    ensure!(
        calls.len() > calls_before,
        "nothing fetched through GIT_SSH_COMMAND after the clone: {calls:?}"
    );
    ensure!(
        calls
            .iter()
            .all(|(_, cmd, _)| cmd.contains("git-upload-pack")),
        "unexpected remote commands: {calls:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What git does to file contents and names

const CRLF_CHECK: &str = r#"set -u
fail() { echo "CRLF-CHECK-FAILED: $*"; od -c "$2" | head -5; exit 1; }
printf 'one\r\ntwo\r\n' | cmp -s - sub/a.txt || fail "sub/a.txt (sub/.gitattributes: *.txt text eol=crlf) has no CRLF" sub/a.txt
printf 'x\r\ny\r\n' | cmp -s - sub/deeper/b.txt || fail "sub/deeper/b.txt (inherits sub/.gitattributes) has no CRLF" sub/deeper/b.txt
printf 'p\nq\n' | cmp -s - sub/raw/c.txt || fail "sub/raw/c.txt (sub/raw/.gitattributes: *.txt -text) was converted" sub/raw/c.txt
printf 'one\ntwo\n' | cmp -s - top.txt || fail "top.txt (no attributes) was converted" top.txt
printf 'bin\n' | cmp -s - sub/a.bin || fail "sub/a.bin (not *.txt) was converted" sub/a.bin
sh ci/git_check.sh
"#;

#[test]
fn nested_gitattributes_give_crlf_bytes_in_the_step() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let spec = spec(&[("crlf", "sh ci/crlf_check.sh", "60s")]);
    let files = [
        (".tinyci.toml", spec.as_str()),
        ("ci/crlf_check.sh", CRLF_CHECK),
        ("sub/.gitattributes", "*.txt text eol=crlf\n"),
        ("sub/a.txt", "one\ntwo\n"),
        ("sub/deeper/b.txt", "x\ny\n"),
        ("sub/raw/.gitattributes", "*.txt -text\n"),
        ("sub/raw/c.txt", "p\nq\n"),
        ("sub/a.bin", "bin\n"),
        ("top.txt", "one\ntwo\n"),
    ];
    let a = commit(&c, "nested attributes", &files)?;
    expect_success(&c, &a)?;
    // An incremental checkout (only an unrelated file changes) keeps them right.
    let b = commit(&c, "unrelated change", &[("other.txt", "o\n")])?;
    expect_success(&c, &b)?;
    Ok(())
}

#[test]
fn changing_only_a_nested_gitattributes_rewrites_the_files_it_covers() -> Result<()> {
    // A fresh clone of the second commit has LF bytes in sub/a.txt; `git checkout` alone
    // keeps the CRLF of the first (the blob did not change), so this needs the engine's
    // care.
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let spec = spec(&[("crlf", "sh ci/crlf_check.sh", "60s")]);
    let a = commit(
        &c,
        "crlf",
        &[
            (".tinyci.toml", &spec),
            (
                "ci/crlf_check.sh",
                "printf 'one\\r\\ntwo\\r\\n' | cmp - sub/a.txt && sh ci/git_check.sh\n",
            ),
            ("sub/.gitattributes", "*.txt text eol=crlf\n"),
            ("sub/a.txt", "one\ntwo\n"),
        ],
    )?;
    expect_success(&c, &a)?;
    let b = commit(
        &c,
        "lf",
        &[
            (".tinyci.toml", &spec),
            (
                "ci/crlf_check.sh",
                "printf 'one\\ntwo\\n' | cmp - sub/a.txt || { od -c sub/a.txt; exit 1; }\nsh ci/git_check.sh\n",
            ),
            ("sub/.gitattributes", "*.txt text eol=lf\n"),
        ],
    )?;
    expect_success(&c, &b)?;
    Ok(())
}

#[test]
fn non_utf8_file_names_survive_checkouts() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let check = r#"set -u
f=$(printf 'caf\351.txt'); d=$(printf 'dir\377')
[ "$(cat "$f")" = "latin-1 name" ] || { ls -b; echo "caf\351.txt missing or wrong"; exit 1; }
[ "$(cat "$d/x.txt")" = "in a non-UTF-8 dir" ] || { ls -b; echo "dir\377/x.txt missing or wrong"; exit 1; }
sh ci/git_check.sh
"#;
    let spec = spec(&[("names", "sh ci/names.sh", "60s")]);
    let check_files = check_files();
    let mut files: Vec<(&[u8], &[u8])> = check_files
        .iter()
        .map(|(p, b)| (p.as_bytes(), b.as_bytes()))
        .collect();
    files.retain(|(p, _)| *p != b".tinyci.toml");
    files.push((b".tinyci.toml", spec.as_bytes()));
    files.push((b"ci/names.sh", check.as_bytes()));
    files.push((b"caf\xe9.txt", b"latin-1 name\n"));
    files.push((b"dir\xff/x.txt", b"in a non-UTF-8 dir\n"));
    let a = commit_raw(&c, "non-UTF-8 names", &files)?;
    expect_success(&c, &a)?;
    // The next checkout, which does not touch them, must not delete them.
    let b = commit(&c, "unrelated", &[("other.txt", "o\n")])?;
    expect_success(&c, &b)?;
    // A rename away from a non-UTF-8 name leaves no stale file.
    let old = c.master.dir.join(OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::rename(&old, c.master.dir.join("cafe.txt"))?;
    let gone = r#"set -u
[ ! -e "$(printf 'caf\351.txt')" ] || { echo "the old name is still there"; exit 1; }
[ "$(cat cafe.txt)" = "latin-1 name" ] || exit 1
sh ci/git_check.sh
"#;
    let c2 = commit(&c, "rename", &[("ci/names.sh", gone)])?;
    expect_success(&c, &c2)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What a step leaves behind

#[test]
fn fifo_or_socket_left_by_a_step_does_not_hang_the_next_checkout() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let leave = r#"set -eu
rm data.txt && mkfifo data.txt
rm same.txt && mkfifo same.txt
mkfifo new-fifo
mkdir -p deep/er && mkfifo deep/er/p
rm sock.txt && python3 -c "import socket; socket.socket(socket.AF_UNIX).bind('sock.txt')"
[ -p data.txt ] && [ -S sock.txt ]
"#;
    let a = commit(
        &c,
        "leave fifos",
        &[
            (".tinyci.toml", &spec(&[("leave", "sh ci/leave.sh", "60s")])),
            ("ci/leave.sh", leave),
            ("data.txt", "v1\n"),
            ("same.txt", "same\n"),
            ("sock.txt", "sock\n"),
        ],
    )?;
    expect_success(&c, &a)?;
    let check = r#"set -u
[ -f data.txt ] && [ "$(cat data.txt)" = v2 ] || { ls -l; echo "data.txt is not the committed file"; exit 1; }
[ -f same.txt ] && [ "$(cat same.txt)" = same ] || { ls -l; echo "same.txt is not the committed file"; exit 1; }
[ -f sock.txt ] || { ls -l; echo "sock.txt is not a file"; exit 1; }
# git clean does not see FIFOs and sockets (git status neither): look for them directly.
left=$(find . -path ./.git -prune -o \( -type p -o -type s \) -print)
[ -z "$left" ] || { echo "FIFOs or sockets left by the last step: $left"; exit 1; }
sh ci/git_check.sh
"#;
    let b = commit(
        &c,
        "after fifos",
        &[
            (".tinyci.toml", &spec(&[("check", "sh ci/check.sh", "60s")])),
            ("ci/check.sh", check),
            ("data.txt", "v2\n"),
        ],
    )?;
    expect_success(&c, &b)?;
    Ok(())
}

/// A step runs `damage`; the next commit (the git check) must still succeed. Returns the
/// runner's log lines about cloning (not counting its path) before and after.
fn damage_then_check(damage: &str) -> Result<(Cluster, usize, usize)> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let clone = c.runner_clones[0].clone();
    let before = clone_lines(&c.runners[0].log(), &clone);
    let a = commit(
        &c,
        "damage",
        &[
            (".tinyci.toml", &spec(&[("damage", damage, "60s")])),
            ("tests/extra/kept.txt", "kept\n"),
        ],
    )?;
    let r = c.wait_result(&a, WAIT)?;
    ensure!(r["status"] == "success", "the damaging step itself: {r}");
    let b = commit(&c, "after the damage", &[("after.txt", damage)])?;
    expect_success(&c, &b)?;
    let after = clone_lines(&c.runners[0].log(), &clone);
    Ok((c, before, after))
}

#[test]
fn chmod_000_and_read_only_directories_left_by_a_step_are_cleaned() -> Result<()> {
    damage_then_check(
        "mkdir -p junk/deep ro && echo x > junk/deep/f && echo y > ro/f && \
         chmod 000 junk/deep junk tests/extra tests && chmod 555 ro",
    )?;
    Ok(())
}

#[test]
fn stale_index_lock_left_by_a_step_is_cleaned() -> Result<()> {
    damage_then_check("touch .git/index.lock")?;
    Ok(())
}

#[test]
fn garbage_in_git_head_is_repaired() -> Result<()> {
    damage_then_check("echo garbage > .git/HEAD")?;
    Ok(())
}

#[test]
fn deleted_objects_are_repaired() -> Result<()> {
    damage_then_check("rm -rf .git/objects")?;
    Ok(())
}

#[test]
fn deleted_git_dir_is_cloned_again_from_origin_and_logged() -> Result<()> {
    let (c, before, after) = damage_then_check("rm -rf .git")?;
    ensure!(
        after > before,
        "the runner repaired a deleted .git without saying it cloned again; its log:\n{}",
        c.runners[0].log()
    );
    // The repaired clone still fetches from the same origin.
    let origin = git(&c.runner_clones[0], &["remote", "get-url", "origin"])?;
    ensure!(
        canonical(Path::new(&origin)) == canonical(&c.master.dir),
        "the repaired clone's origin is {origin}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Submodules

#[test]
fn submodules_are_checked_out_recursively_at_their_recorded_commits() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let tmp = c.tmp.path();
    let file_ok = ["-c", "protocol.file.allow=always"];
    let with = |dir: &Path, args: &[&str]| -> Result<String> {
        let mut all = file_ok.to_vec();
        all.extend_from_slice(args);
        git(dir, &all)
    };
    // inner <- lib (submodule deps/inner) <- master (submodule lib)
    let inner = tmp.join("inner");
    std::fs::create_dir_all(&inner)?;
    git(&inner, &["init", "-q"])?;
    std::fs::write(inner.join("inner.txt"), "inner v1\n")?;
    git(&inner, &["add", "-A"])?;
    git(&inner, &["commit", "-qm", "inner v1"])?;
    let lib = tmp.join("lib");
    std::fs::create_dir_all(&lib)?;
    git(&lib, &["init", "-q"])?;
    std::fs::write(lib.join("lib.txt"), "lib v1\n")?;
    with(
        &lib,
        &[
            "submodule",
            "add",
            "-q",
            &inner.display().to_string(),
            "deps/inner",
        ],
    )?;
    git(&lib, &["add", "-A"])?;
    git(&lib, &["commit", "-qm", "lib v1"])?;
    let lib_v1 = git(&lib, &["rev-parse", "HEAD"])?;
    with(
        &c.master.dir,
        &["submodule", "add", "-q", &lib.display().to_string(), "lib"],
    )?;
    // lib moves on after master recorded v1: the runner must not take lib's tip.
    std::fs::write(lib.join("lib.txt"), "lib v2\n")?;
    git(&lib, &["commit", "-qam", "lib v2"])?;
    let lib_v2 = git(&lib, &["rev-parse", "HEAD"])?;
    let check = |want: &str, text: &str| {
        format!(
            r#"set -u
got=$(git -C lib rev-parse HEAD) || exit 1
[ "$got" = "{want}" ] || {{ echo "lib is at $got, recorded {want}"; exit 1; }}
[ "$(cat lib/lib.txt)" = "{text}" ] || {{ echo "lib/lib.txt: $(cat lib/lib.txt)"; exit 1; }}
[ "$(cat lib/deps/inner/inner.txt)" = "inner v1" ] || {{ echo "nested submodule not checked out"; exit 1; }}
bad=$(git submodule status --recursive | grep -v '^ ') && {{ echo "$bad"; echo "submodules not at their recorded commits"; exit 1; }}
st=$(git -C lib status --porcelain --ignored) ; [ -z "$st" ] || {{ echo "$st"; exit 1; }}
sh ci/git_check.sh
"#
        )
    };
    let spec = spec(&[("sub", "sh ci/sub.sh", "60s")]);
    let a = commit(
        &c,
        "add lib at v1",
        &[
            (".tinyci.toml", &spec),
            ("ci/sub.sh", &check(&lib_v1, "lib v1")),
        ],
    )?;
    expect_success(&c, &a)?;
    // Move the recorded commit to v2.
    with(&c.master.dir.join("lib"), &["fetch", "-q", "origin"])?;
    git(&c.master.dir.join("lib"), &["checkout", "-q", &lib_v2])?;
    let b = commit(&c, "lib to v2", &[("ci/sub.sh", &check(&lib_v2, "lib v2"))])?;
    expect_success(&c, &b)?;
    // Remove the submodule: nothing of it may stay.
    git(&c.master.dir, &["rm", "-q", "-r", "lib"])?;
    let gone =
        "[ ! -e lib ] || { ls -la lib; echo 'lib is still there'; exit 1; }\nsh ci/git_check.sh\n";
    let d = commit(&c, "drop lib", &[("ci/sub.sh", gone)])?;
    expect_success(&c, &d)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The spec is data

/// The commit gets an `error` result whose text contains one of `words`; the runner lives
/// and the next commit succeeds.
fn spec_error_then_success(c: &Cluster, sha: &str, words: &[&str]) -> Result<()> {
    let r = c.wait_result(sha, WAIT)?;
    ensure!(r["status"] == "error", "expected error: {r}");
    let text = r["error"].as_str().unwrap_or("").to_lowercase();
    ensure!(
        words.iter().any(|w| text.contains(w)),
        "the error {text:?} names none of {words:?}"
    );
    let next = commit(c, "a good spec again", &[("next.txt", "n\n")])?;
    expect_success(c, &next)?;
    Ok(())
}

#[test]
fn spec_that_is_a_symlink_to_dev_zero_is_an_error_and_the_runner_lives() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let spec = c.master.dir.join(".tinyci.toml");
    std::fs::remove_file(&spec)?;
    std::os::unix::fs::symlink("/dev/zero", &spec)?;
    git(&c.master.dir, &["add", "-A"])?;
    git(&c.master.dir, &["commit", "-qm", "spec is a symlink"])?;
    let sha = c.master.head()?;
    // Restore a regular file for the next commit.
    std::fs::remove_file(&spec)?;
    spec_error_then_success(&c, &sha, &["symlink", "symbolic link"])
}

#[test]
fn spec_larger_than_the_limit_is_an_error_and_the_runner_lives() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let mut big = check_spec();
    while big.len() <= 300 * 1024 {
        big.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    let sha = commit(&c, "huge spec", &[(".tinyci.toml", &big)])?;
    spec_error_then_success(&c, &sha, &["large", "limit", "size", "bytes"])
}

// ---------------------------------------------------------------------------------------
// An origin that never answers

const FAST_LIMITS: [&str; 4] = [
    "--fetch-connect-timeout",
    "1s",
    "--fetch-stall-timeout",
    "2s",
];

#[test]
fn hanging_origin_ends_the_attempt_with_an_infrastructure_reason_within_the_deadline() -> Result<()>
{
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            max_attempts: 1,
            ..Opts::default()
        },
    )?;
    let hang = HangingServer::start()?;
    // The observer keeps the working local origin; only the runner's fetch hangs.
    c.add_runner_with(&CloneSetup {
        origin: Some(hang.git_url()),
        ..CloneSetup::args(&FAST_LIMITS)
    })?;
    // The tip is in the clone already: whether the runner fetches for it is its business.
    c.wait_result(&c.master.head()?, WAIT)?;
    let sha = c.commit("only on origin", &[("new.txt", "new\n")])?;
    c.wait_assigned(&sha)?;
    let assigned = Instant::now();
    // An unreachable origin is the infrastructure's, never the commit's: the attempt is
    // handed back with the reason (no result), and the runner pauses until origin answers.
    let line = c
        .dispatcher()
        .wait_for(&["handed the commit back", &format!("commit={sha}")], WAIT)?;
    let took = assigned.elapsed();
    ensure!(
        hang.accepted() >= 1,
        "the runner never connected to its origin"
    );
    let text = line.to_lowercase();
    ensure!(
        (text.contains("fetch") || text.contains("origin"))
            && ["time", "stall", "progress", "no data", "hang", "no answer"]
                .iter()
                .any(|w| text.contains(w)),
        "the reason does not say the fetch timed out: {text:?}"
    );
    ensure!(
        took < Duration::from_secs(10),
        "the attempt took {took:?} with a 2 s stall timeout"
    );
    c.runners[0].wait_for(&["pausing"], WAIT)?;
    ensure!(
        !c.json_path(&sha).exists(),
        "an unreachable origin gave the commit a verdict"
    );
    ensure!(c.runners[0].is_running(), "the runner died");
    // The timed-out fetch left no git process behind (a probe of the paused runner's
    // origin may be under way: it is bounded the same way).
    let (clone, runner) = (c.runner_clones[0].clone(), c.runners[0].pid());
    wait_until(
        "no fetch left in the runner's clone",
        Duration::from_secs(2),
        || {
            processes_in(&clone, &[runner])
                .iter()
                .all(|p| p.contains("ls-remote"))
        },
    )
    .map_err(|e| anyhow!("{e}: {:?}", processes_in(&clone, &[runner])))?;
    Ok(())
}

/// A runner whose origin is `url` (a hanging server) is stuck in a fetch; SIGTERM must stop
/// it within 2 s, leaving no process in its clone. (The observer keeps the working local
/// origin and runs in a clone of its own.)
fn sigterm_during_hanging_fetch(url: fn(&HangingServer) -> String) -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            ..Opts::default()
        },
    )?;
    let hang = HangingServer::start()?;
    // A commit the clone will not have, so the runner must fetch it.
    let clone = c.new_clone(&CloneSetup {
        origin: Some(url(&hang)),
        ..CloneSetup::default()
    })?;
    c.commit("only on origin", &[("new.txt", "new\n")])?;
    let idx = c.add_runner_on(
        clone.clone(),
        &CloneSetup::args(&[
            "--fetch-connect-timeout",
            "60s",
            "--fetch-stall-timeout",
            "60s",
        ]),
    )?;
    hang.wait_accepted(1, WAIT).with_context(|| {
        format!(
            "runner log:\n{}\ndispatcher log:\n{}\nobserver log:\n{}",
            c.runners[idx].log(),
            c.dispatcher().log(),
            c.observer.as_ref().map(Proc::log).unwrap_or_default()
        )
    })?;
    let runner = c.runners[idx].pid();
    wait_until("a git process fetching in the clone", WAIT, || {
        !processes_in(&clone, &[runner]).is_empty()
    })?;
    let t0 = Instant::now();
    let status = c.runners[idx].terminate(Duration::from_secs(2));
    let took = t0.elapsed();
    ensure!(
        status.is_some(),
        "the runner did not exit within 2 s of SIGTERM; left: {:?}\nits log:\n{}",
        processes_in(&clone, &[]),
        c.runners[idx].log()
    );
    wait_until(
        "the runner's processes to be gone",
        Duration::from_millis(500),
        || processes_in(&clone, &[]).is_empty(),
    )
    .map_err(|e| anyhow!("{e}: {:?}", processes_in(&clone, &[])))?;
    eprintln!("runner stopped {took:?} after SIGTERM");
    Ok(())
}

#[test]
fn sigterm_stops_a_runner_stuck_in_a_git_protocol_fetch_within_2s() -> Result<()> {
    sigterm_during_hanging_fetch(HangingServer::git_url)
}

#[test]
fn sigterm_stops_a_runner_stuck_in_an_http_fetch_within_2s() -> Result<()> {
    sigterm_during_hanging_fetch(HangingServer::http_url)
}

#[test]
fn sigterm_stops_an_observer_stuck_in_a_hanging_fetch_within_2s() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let hang = HangingServer::start()?;
    let mut obs = c.spawn_observer_raw(&CloneSetup {
        origin: Some(hang.http_url()),
        ..CloneSetup::args(&[
            "--fetch-connect-timeout",
            "60s",
            "--fetch-stall-timeout",
            "60s",
        ])
    })?;
    let clone = c.observer_clone().to_owned();
    hang.wait_accepted(1, WAIT)
        .with_context(|| format!("observer log:\n{}", obs.log()))?;
    let t0 = Instant::now();
    let status = obs.terminate(Duration::from_secs(2));
    ensure!(
        status.is_some(),
        "the observer did not exit within 2 s of SIGTERM; left: {:?}\nits log:\n{}",
        processes_in(&clone, &[]),
        obs.log()
    );
    eprintln!("observer stopped {:?} after SIGTERM", t0.elapsed());
    wait_until(
        "the observer's processes to be gone",
        Duration::from_millis(500),
        || processes_in(&clone, &[]).is_empty(),
    )
    .map_err(|e| anyhow!("{e}: {:?}", processes_in(&clone, &[])))?;
    Ok(())
}

#[test]
fn observer_gives_up_a_hanging_fetch_and_polls_again() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let hang = HangingServer::start()?;
    let mut obs = c.spawn_observer_raw(&CloneSetup {
        origin: Some(hang.git_url()),
        ..CloneSetup::args(&FAST_LIMITS)
    })?;
    // With a 2 s stall timeout, a second poll connects within a few seconds.
    hang.wait_accepted(2, Duration::from_secs(15))
        .with_context(|| format!("observer log:\n{}", obs.log()))?;
    ensure!(obs.is_running(), "the observer exited:\n{}", obs.log());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What is refused at start

/// Starts a runner on `path` and expects it to exit non-zero within the wait, without ever
/// listening; returns its log.
fn refused(c: &Cluster, path: &Path, setup: &CloneSetup) -> Result<String> {
    let mut p = c.spawn_runner_raw(path, setup)?;
    let status = p.wait_exit(WAIT).ok_or_else(|| {
        anyhow!(
            "a runner on {} was not refused:\n{}",
            path.display(),
            p.log()
        )
    })?;
    ensure!(
        !status.success(),
        "a runner on {} exited 0:\n{}",
        path.display(),
        p.log()
    );
    Ok(p.log())
}

/// The clone is intact: git works in it and its files are there.
fn intact(clone: &Path) -> Result<()> {
    git(clone, &["status", "--porcelain"])?;
    ensure!(
        clone.join(".tinyci.toml").is_file() && clone.join(".git/HEAD").is_file(),
        "the clone at {} lost files",
        clone.display()
    );
    Ok(())
}

#[test]
fn runner_refuses_a_git_dir_and_names_the_work_tree_to_pass() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let clone = c.new_clone(&CloneSetup::default())?;
    let log = refused(&c, &clone.join(".git"), &CloneSetup::default())?;
    ensure!(
        names_path(&log, &clone),
        "the refusal does not name the work tree to pass ({}):\n{log}",
        clone.display()
    );
    intact(&clone)
}

#[test]
fn runner_refuses_a_bare_repository() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let bare = c.tmp.path().join("bare.git");
    let out = std::process::Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&c.master.dir)
        .arg(&bare)
        .output()?;
    ensure!(out.status.success(), "git clone --bare failed");
    let log = refused(&c, &bare, &CloneSetup::default())?;
    ensure!(
        log.to_lowercase().contains("bare"),
        "the refusal does not say bare:\n{log}"
    );
    Ok(())
}

#[test]
fn runner_refuses_a_subdirectory_of_a_work_tree_and_names_its_top() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let clone = c.new_clone(&CloneSetup::default())?;
    let log = refused(&c, &clone.join("tests"), &CloneSetup::default())?;
    ensure!(
        names_path(&log, &clone),
        "the refusal does not name the top of the work tree ({}):\n{log}",
        clone.display()
    );
    intact(&clone)
}

#[test]
fn runner_refuses_a_missing_path() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let missing = c.tmp.path().join("no-such-clone");
    let log = refused(&c, &missing, &CloneSetup::default())?;
    ensure!(
        log.contains(&missing.display().to_string()),
        "the refusal does not name the path:\n{log}"
    );
    ensure!(
        !missing.exists(),
        "the runner created {}",
        missing.display()
    );
    Ok(())
}

#[test]
fn runner_refuses_a_clone_without_origin() -> Result<()> {
    let mut c = Cluster::start(bins(), bare_opts())?;
    let clone = c.new_clone(&CloneSetup::default())?;
    git(&clone, &["remote", "remove", "origin"])?;
    let log = refused(&c, &clone, &CloneSetup::default())?;
    ensure!(
        log.contains("origin"),
        "the refusal does not mention origin:\n{log}"
    );
    Ok(())
}

#[test]
fn runner_refuses_a_dirty_clone_unless_told_to_discard_changes() -> Result<()> {
    let mut c = Cluster::start(
        bins(),
        Opts {
            runners: 0,
            ..Opts::default()
        },
    )?;
    let clone = c.new_clone(&CloneSetup::default())?;
    std::fs::write(clone.join("calc.py"), "# a person's unsaved work\n")?;
    std::fs::write(clone.join("notes.txt"), "untracked\n")?;
    let log = refused(&c, &clone, &CloneSetup::default())?;
    ensure!(
        log.contains("--discard-changes"),
        "the refusal does not name --discard-changes:\n{log}"
    );
    // Nothing was touched.
    ensure!(
        std::fs::read_to_string(clone.join("calc.py"))? == "# a person's unsaved work\n"
            && clone.join("notes.txt").exists(),
        "the refused runner changed the dirty clone"
    );
    // Only untracked files count too.
    let clone2 = c.new_clone(&CloneSetup::default())?;
    std::fs::write(clone2.join("untracked.txt"), "mine\n")?;
    let log = refused(&c, &clone2, &CloneSetup::default())?;
    ensure!(
        log.contains("--discard-changes"),
        "untracked file not refused:\n{log}"
    );
    // With the flag the runner takes it over and the work is gone.
    c.add_runner_on(clone.clone(), &CloneSetup::args(&["--discard-changes"]))?;
    c.wait_result(&c.master.head()?, WAIT)?;
    let sha = commit(&c, "after discarding", &[("x.txt", "x\n")])?;
    expect_success(&c, &sha)?;
    ensure!(!clone.join("notes.txt").exists(), "notes.txt survived");
    Ok(())
}

#[test]
fn observer_refuses_a_git_dir_a_bare_repository_and_a_subdirectory() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let clone = c.observer_clone().to_owned();
    let bare = c.tmp.path().join("bare.git");
    git(
        c.tmp.path(),
        &[
            "clone",
            "-q",
            "--bare",
            &c.master.dir.display().to_string(),
            "bare.git",
        ],
    )?;
    for path in [clone.join(".git"), bare.clone(), clone.join("tests")] {
        let mut p = c.spawn_observer_on(&path, &CloneSetup::default())?;
        let status = p.wait_exit(WAIT).ok_or_else(|| {
            anyhow!(
                "an observer on {} was not refused:\n{}",
                path.display(),
                p.log()
            )
        })?;
        ensure!(
            !status.success(),
            "observer on {} exited 0:\n{}",
            path.display(),
            p.log()
        );
        ensure!(
            p.count(&["watching"]) == 0,
            "observer on {} started watching",
            path.display()
        );
    }
    intact(&clone)
}

#[test]
fn observer_refuses_a_state_file_in_a_missing_directory() -> Result<()> {
    let c = Cluster::start(bins(), bare_opts())?;
    let missing = c.tmp.path().join("no-such-dir").join("observer.state");
    let setup = CloneSetup::args(&["--state-file", &missing.display().to_string()]);
    let mut p = c.spawn_observer_raw(&setup)?;
    let status = p
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow!("the observer went on:\n{}", p.log()))?;
    ensure!(!status.success(), "exited 0:\n{}", p.log());
    ensure!(
        p.log().contains("no-such-dir does not exist"),
        "no clear error:\n{}",
        p.log()
    );
    ensure!(p.count(&["watching"]) == 0, "it started watching");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One process per clone

#[test]
fn second_runner_on_the_same_clone_is_refused_while_the_first_keeps_working() -> Result<()> {
    let c = Cluster::start_ready(bins(), Opts::default())?;
    let started = c.tmp.path().join("step-started");
    let release = c.tmp.path().join("step-release");
    let wait_step = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done; sh ci/git_check.sh",
        started.display(),
        release.display()
    );
    let sha = commit(
        &c,
        "a step that waits",
        &[(".tinyci.toml", &spec(&[("wait", &wait_step, "60s")]))],
    )?;
    wait_until("the step to start", WAIT, || started.exists())?;
    let first = c.runners[0].pid();
    let log = refused(&c, &c.runner_clones[0], &CloneSetup::default())?;
    ensure!(
        log.contains(&format!("pid {first}")),
        "the refusal does not name the holder (pid {first}):\n{log}"
    );
    ensure!(
        !step_processes(&sha).is_empty(),
        "the first runner's step is gone after the second runner started"
    );
    std::fs::write(&release, "")?;
    expect_success(&c, &sha)?;
    Ok(())
}

#[test]
fn second_observer_on_the_same_clone_is_refused() -> Result<()> {
    let c = Cluster::start(bins(), Opts::default())?;
    let first = c.observer.as_ref().map(Proc::pid).unwrap_or(0);
    let mut p = c.spawn_observer_on(c.observer_clone(), &CloneSetup::default())?;
    let status = p
        .wait_exit(WAIT)
        .ok_or_else(|| anyhow!("a second observer was not refused:\n{}", p.log()))?;
    ensure!(!status.success(), "second observer exited 0");
    ensure!(
        p.log().contains(&format!("pid {first}")),
        "the refusal does not name the holder (pid {first}):\n{}",
        p.log()
    );
    // The first still reports commits.
    let sha = commit(&c, "after the second observer", &[("x.txt", "x\n")])?;
    expect_success(&c, &sha)?;
    Ok(())
}

#[test]
fn missing_loose_objects_and_alternates_are_repaired() -> Result<()> {
    damage_then_check(
        "rm -f .git/objects/info/alternates && find .git/objects -path '*/??/*' -type f -delete",
    )?;
    Ok(())
}

#[test]
fn head_naming_a_missing_object_is_repaired() -> Result<()> {
    damage_then_check("echo 1234567890123456789012345678901234567890 > .git/HEAD")?;
    Ok(())
}

// Damage found by a hostile test: each left the runner broken for every later commit
// (an error every time, or a job that hung for ever and ignored SIGTERM), or a later good
// commit failing.

#[test]
fn a_fifo_in_place_of_git_head_does_not_hang_the_next_job() -> Result<()> {
    damage_then_check("rm .git/HEAD && mkfifo .git/HEAD")?;
    Ok(())
}

#[test]
fn a_directory_in_place_of_git_config_is_repaired() -> Result<()> {
    damage_then_check("rm .git/config && mkdir .git/config")?;
    Ok(())
}

#[test]
fn an_objects_symlink_to_nowhere_is_repaired() -> Result<()> {
    damage_then_check("rm -rf .git/objects && ln -s /nonexistent/objects .git/objects")?;
    Ok(())
}

#[test]
fn a_clone_made_shallow_by_a_step_is_whole_again() -> Result<()> {
    damage_then_check("git rev-parse HEAD > .git/shallow")?;
    Ok(())
}

#[test]
fn replaced_objects_and_a_bisect_left_by_a_step_are_removed() -> Result<()> {
    damage_then_check(
        "git replace $(git rev-parse HEAD:ci/git_check.sh) $(echo 'exit 1' | git hash-object -w --stdin) && git bisect start",
    )?;
    Ok(())
}

#[test]
fn a_step_that_deletes_the_whole_clone_does_not_break_the_runner() -> Result<()> {
    damage_then_check("d=$(pwd) && cd / && rm -rf \"$d\"")?;
    Ok(())
}

#[test]
fn a_git_symlink_to_origin_is_not_written_through() -> Result<()> {
    let (c, _, _) = damage_then_check(
        "u=$(git config remote.origin.url) && rm -rf .git && ln -s \"$u/.git\" .git",
    )?;
    // The master (the runners' origin) is as it was: on its branch, not detached at the
    // runner's commit.
    let head = git(&c.master.dir, &["symbolic-ref", "HEAD"])?;
    ensure!(head.starts_with("refs/heads/"), "master's HEAD: {head}");
    ensure!(
        std::fs::symlink_metadata(c.runner_clones[0].join(".git"))?.is_dir(),
        "the runner's .git is still a symlink"
    );
    Ok(())
}
