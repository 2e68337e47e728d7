//! Differential property test of the checkout engine (issue 8): random histories and
//! random junk left between checkouts; after every `Workspace::prepare` the runner's clone
//! must equal a fresh `git clone` + `git checkout --detach SHA` of the same commit —
//! `git ls-files -s`, every file's bytes and mode, symlink targets, no other entries,
//! `git status --porcelain --ignored` empty, HEAD detached at the commit, every object of
//! HEAD readable, and nothing outside the clone touched.
//!
//! Histories are written with `git fast-import` into a bare origin: adds, deletes, renames,
//! mode changes, file↔symlink↔directory type changes, symlinks in and out of the tree,
//! nested `.gitattributes` (`text eol=crlf`, `-text`, `eol=lf`), non-UTF-8 names; now and
//! then the origin is repacked, or rewound and pruned. Blobs never hold a CR, so every
//! history is one `git add` could have made under any attributes.
//!
//! Seeded: each case prints its seed; replay one with `TINYCI_DIFF_SEED=<seed>
//! TINYCI_DIFF_CASES=1`. `TINYCI_DIFF_CASES` (default 4) scales the number of cases; the
//! big case (thousands of files) runs once per four small ones. A run goes on after a
//! difference, and reports every kind of difference it saw, with its first example.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tinyci::git::{Workspace, WorkspaceOptions};
use tinyci::proto::CommitId;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Randomness

/// xorshift64*: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero; spread close seeds apart.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True `num` times in `den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next() % den < num
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn pick_bytes(&mut self, items: &[&'static [u8]]) -> &'static [u8] {
        items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------
// Running git

/// Runs git in `dir` with a fixed identity; stdout on success.
fn git_raw(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "user.name=tinyci test",
        "-c",
        "user.email=test@tinyci.invalid",
        "-c",
        "init.defaultBranch=master",
        "-c",
        "commit.gpgsign=false",
        "-c",
        "gc.auto=0",
    ])
    .args(args)
    .current_dir(dir)
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting git {args:?}"))?;
    // Fed from a thread: git may answer before it has read everything.
    let feeder = match stdin {
        Some(input) => {
            let mut pipe = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
            let input = input.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            }))
        }
        None => None,
    };
    let out = child.wait_with_output()?;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    if !out.status.success() {
        bail!(
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&git_raw(dir, args, None)?)
        .trim()
        .to_owned())
}

fn path_of(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------
// The model of a commit's tree

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    File { bytes: Vec<u8>, exec: bool },
    Link(Vec<u8>),
}

/// Path (bytes, `/`-separated) → entry. Directories are implied by their entries.
type Tree = BTreeMap<Vec<u8>, Entry>;

const DIR_NAMES: &[&[u8]] = &[
    b"src",
    b"sub",
    b"caf\xe9",
    b"d\xff",
    b"build",
    b"n1",
    b"n2",
    b"space dir",
    b"deep",
];

const FILE_NAMES: &[&[u8]] = &[
    b"a",
    b"b.txt",
    b"c.dat",
    b"d.bin",
    b"e f.txt",
    b"caf\xe9.txt",
    b"\xff\xfe.txt",
    "ü.txt".as_bytes(),
    b"x.log",
    b"-dash",
    b".hidden",
    b"README",
    b"tab\there.txt",
];

const ATTRIBUTES: &[&[u8]] = &[
    b"*.txt text eol=crlf\n",
    b"* text eol=crlf\n",
    b"*.txt -text\n",
    b"* -text\n",
    b"*.dat text eol=lf\n",
    b"*.txt text\n*.bin binary\n",
    b"*.dat text eol=crlf\n*.txt -text\n",
];

const GITIGNORE: &[u8] = b"*.log\nbuild/\n/ignored-*\n*.o\n";

/// The directories of `tree` (every proper prefix of an entry's path).
fn dirs_of(tree: &Tree) -> BTreeSet<Vec<u8>> {
    let mut out = BTreeSet::new();
    for p in tree.keys() {
        for (i, b) in p.iter().enumerate() {
            if *b == b'/' {
                out.insert(p[..i].to_vec());
            }
        }
    }
    out
}

/// Whether a new entry at `path` fits: not an existing entry or directory, and no parent
/// of it is an entry.
fn fits(tree: &Tree, dirs: &BTreeSet<Vec<u8>>, path: &[u8]) -> bool {
    if tree.contains_key(path) || dirs.contains(path) {
        return false;
    }
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .all(|(i, _)| !tree.contains_key(&path[..i]))
}

fn random_text(rng: &mut Rng) -> Vec<u8> {
    const LINES: &[&[u8]] = &[
        b"hello\n",
        b"fn main() {}\n",
        b"\n",
        b"  indented line\n",
        b"caf\xc3\xa9\n",
        b"no newline at end",
        b"x = 1\n",
    ];
    let mut out = Vec::new();
    for _ in 0..rng.below(6) {
        out.extend_from_slice(rng.pick_bytes(LINES));
    }
    out
}

fn random_content(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => Vec::new(),
        1 => {
            // Binary: NULs and high bytes, but never a CR.
            (0..rng.below(64) + 1)
                .map(|_| match (rng.next() % 256) as u8 {
                    b'\r' => 0,
                    b => b,
                })
                .collect()
        }
        _ => random_text(rng),
    }
}

fn random_dir(rng: &mut Rng, dirs: &BTreeSet<Vec<u8>>) -> Vec<u8> {
    // Half the time an existing directory, else a new path of depth 0–3.
    if !dirs.is_empty() && rng.chance(1, 2) {
        let all: Vec<&Vec<u8>> = dirs.iter().collect();
        return rng.pick(&all).to_vec();
    }
    let mut p = Vec::new();
    for _ in 0..rng.below(4) {
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(rng.pick_bytes(DIR_NAMES));
    }
    p
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        let mut p = dir.to_vec();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn random_free_path(rng: &mut Rng, tree: &Tree) -> Option<Vec<u8>> {
    let dirs = dirs_of(tree);
    for _ in 0..20 {
        let dir = random_dir(rng, &dirs);
        let mut name = rng.pick_bytes(FILE_NAMES).to_vec();
        if rng.chance(1, 3) {
            name.extend_from_slice(format!("{}", rng.below(100)).as_bytes());
        }
        let p = join(&dir, &name);
        if fits(tree, &dirs, &p) {
            return Some(p);
        }
    }
    None
}

fn random_link_target(rng: &mut Rng, outside: &Path) -> Vec<u8> {
    let choices: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"../a".to_vec(),
        b"sub/b.txt".to_vec(),
        b"src".to_vec(),
        b"/etc/passwd".to_vec(),
        b"/nonexistent/x".to_vec(),
        b"../../../../../outside".to_vec(),
        b"caf\xe9.txt".to_vec(),
        outside.as_os_str().as_bytes().to_vec(),
    ];
    rng.pick(&choices).clone()
}

/// The keys of entries (not `.gitignore`) of `tree`.
fn entries(tree: &Tree) -> Vec<Vec<u8>> {
    tree.keys()
        .filter(|k| k.as_slice() != b".gitignore")
        .cloned()
        .collect()
}

/// One random change to `tree`; returns what it did.
fn mutate(rng: &mut Rng, tree: &mut Tree, outside: &Path) -> String {
    let keys = entries(tree);
    let dirs = dirs_of(tree);
    match rng.below(13) {
        0..=2 => {
            if let Some(p) = random_free_path(rng, tree) {
                let e = if rng.chance(1, 6) {
                    Entry::Link(random_link_target(rng, outside))
                } else {
                    Entry::File {
                        bytes: random_content(rng),
                        exec: rng.chance(1, 5),
                    }
                };
                tree.insert(p.clone(), e);
                return format!("add {}", show(&p));
            }
        }
        3 if !keys.is_empty() => {
            let k = rng.pick(&keys).clone();
            tree.remove(&k);
            return format!("delete {}", show(&k));
        }
        4 if !keys.is_empty() => {
            let k = rng.pick(&keys).clone();
            let e = tree.remove(&k).expect("picked from the tree");
            if let Some(to) = random_free_path(rng, tree) {
                tree.insert(to.clone(), e);
                return format!("rename {} -> {}", show(&k), show(&to));
            }
            tree.insert(k, e);
        }
        5 | 6 if !keys.is_empty() => {
            let k = rng.pick(&keys).clone();
            if let Some(Entry::File { bytes, .. }) = tree.get_mut(&k) {
                *bytes = random_content(rng);
                return format!("modify {}", show(&k));
            }
        }
        7 if !keys.is_empty() => {
            let k = rng.pick(&keys).clone();
            if let Some(Entry::File { exec, .. }) = tree.get_mut(&k) {
                *exec = !*exec;
                return format!("chmod {}", show(&k));
            }
        }
        8 if !keys.is_empty() => {
            // file <-> symlink
            let k = rng.pick(&keys).clone();
            let e = match tree.get(&k) {
                Some(Entry::File { .. }) => Entry::Link(random_link_target(rng, outside)),
                _ => Entry::File {
                    bytes: random_content(rng),
                    exec: false,
                },
            };
            tree.insert(k.clone(), e);
            return format!("type change (file/symlink) {}", show(&k));
        }
        9 if !keys.is_empty() => {
            // file or symlink -> directory
            let k = rng.pick(&keys).clone();
            tree.remove(&k);
            let child = join(&k, rng.pick_bytes(FILE_NAMES));
            tree.insert(
                child,
                Entry::File {
                    bytes: random_content(rng),
                    exec: false,
                },
            );
            return format!("type change (entry -> dir) {}", show(&k));
        }
        10 if !dirs.is_empty() => {
            // directory -> file
            let all: Vec<&Vec<u8>> = dirs.iter().collect();
            let d = rng.pick(&all).to_vec();
            let mut prefix = d.clone();
            prefix.push(b'/');
            tree.retain(|k, _| !k.starts_with(&prefix));
            let e = if rng.chance(1, 3) {
                Entry::Link(random_link_target(rng, outside))
            } else {
                Entry::File {
                    bytes: random_content(rng),
                    exec: false,
                }
            };
            tree.insert(d.clone(), e);
            return format!("type change (dir -> entry) {}", show(&d));
        }
        _ => {
            // A .gitattributes somewhere: add, change or remove.
            let mut places: Vec<Vec<u8>> = dirs.iter().cloned().collect();
            places.push(Vec::new());
            let dir = rng.pick(&places).clone();
            let p = join(&dir, b".gitattributes");
            if tree.contains_key(&p) && rng.chance(1, 3) {
                tree.remove(&p);
                return format!("remove {}", show(&p));
            }
            if fits(tree, &dirs, &p) || tree.contains_key(&p) {
                let body = rng.pick_bytes(ATTRIBUTES).to_vec();
                let what = format!("{} = {:?}", show(&p), show(&body));
                tree.insert(
                    p,
                    Entry::File {
                        bytes: body,
                        exec: false,
                    },
                );
                return what;
            }
        }
    }
    "nothing".into()
}

/// A first tree: `.gitignore`, a few attributes, and `files` random files.
fn initial_tree(rng: &mut Rng, files: usize, outside: &Path) -> Tree {
    let mut tree = Tree::new();
    tree.insert(
        b".gitignore".to_vec(),
        Entry::File {
            bytes: GITIGNORE.to_vec(),
            exec: false,
        },
    );
    tree.insert(
        b"sub/.gitattributes".to_vec(),
        Entry::File {
            bytes: ATTRIBUTES[0].to_vec(),
            exec: false,
        },
    );
    for i in 0..files {
        if files > 200 {
            // Wide and deep enough for thousands: d<i%40>/e<i%7>/f<i>.txt and friends.
            let ext = ["txt", "dat", "bin", "rs"][i % 4];
            let p = format!("d{}/e{}/f{i}.{ext}", i % 40, i % 7);
            tree.insert(
                p.into_bytes(),
                Entry::File {
                    bytes: random_content(rng),
                    exec: i % 11 == 0,
                },
            );
            if i % 97 == 0 {
                let link = format!("d{}/link{i}", i % 40);
                tree.insert(
                    link.into_bytes(),
                    Entry::Link(random_link_target(rng, outside)),
                );
            }
        } else if let Some(p) = random_free_path(rng, &tree) {
            tree.insert(
                p,
                Entry::File {
                    bytes: random_content(rng),
                    exec: rng.chance(1, 5),
                },
            );
        }
    }
    for d in [&b"d3"[..], b"d5/e1", b"caf\xe9"] {
        let p = join(d, b".gitattributes");
        let dirs = dirs_of(&tree);
        if dirs.contains(d) && fits(&tree, &dirs, &p) {
            tree.insert(
                p,
                Entry::File {
                    bytes: rng.pick_bytes(ATTRIBUTES).to_vec(),
                    exec: false,
                },
            );
        }
    }
    tree
}

// ---------------------------------------------------------------------------------------
// The origin

struct Origin {
    dir: PathBuf,
    /// Every commit made, oldest first, with its tree; `false` once pruned from origin.
    commits: Vec<(String, Tree, bool)>,
    counter: u64,
}

impl Origin {
    fn create(dir: &Path) -> Result<Origin> {
        std::fs::create_dir_all(dir)?;
        git(dir, &["init", "-q", "--bare"])?;
        Ok(Origin {
            dir: dir.to_owned(),
            commits: Vec::new(),
            counter: 0,
        })
    }

    /// Writes `tree` as a new commit on master (on top of `parent`); returns its sha.
    fn commit(&mut self, tree: &Tree, parent: Option<&str>, seed: u64) -> Result<String> {
        self.counter += 1;
        let mut s: Vec<u8> = Vec::new();
        let msg = format!("commit {} of seed {seed}\n", self.counter);
        write!(
            s,
            "commit refs/heads/master\ncommitter T <t@tinyci.invalid> {} +0000\ndata {}\n{msg}",
            1_700_000_000 + self.counter,
            msg.len()
        )?;
        if let Some(p) = parent {
            writeln!(s, "from {p}")?;
        }
        s.extend_from_slice(b"deleteall\n");
        for (path, e) in tree {
            let (mode, body) = match e {
                Entry::File { bytes, exec } => (if *exec { "100755" } else { "100644" }, bytes),
                Entry::Link(target) => ("120000", target),
            };
            write!(s, "M {mode} inline ")?;
            s.extend_from_slice(path);
            writeln!(s, "\ndata {}", body.len())?;
            s.extend_from_slice(body);
            s.push(b'\n');
        }
        s.push(b'\n');
        git_raw(&self.dir, &["fast-import", "--quiet", "--force"], Some(&s))?;
        let sha = git(&self.dir, &["rev-parse", "refs/heads/master"])?;
        self.commits.push((sha.clone(), tree.clone(), true));
        Ok(sha)
    }

    /// Moves master back to commit `keep` and prunes everything after it from origin.
    fn rewind_and_prune(&mut self, keep: usize) -> Result<()> {
        let sha = self.commits[keep].0.clone();
        git(&self.dir, &["update-ref", "refs/heads/master", &sha])?;
        git(&self.dir, &["reflog", "expire", "--expire=now", "--all"])?;
        git(&self.dir, &["gc", "-q", "--prune=now"])?;
        for (i, c) in self.commits.iter_mut().enumerate() {
            // Linear history: what is not an ancestor of `keep` is gone.
            if i > keep {
                c.2 = false;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Comparing a clone with a fresh clone

#[derive(Debug, PartialEq)]
enum Node {
    File { mode: u32, bytes: Vec<u8> },
    Link(Vec<u8>),
    Dir { owner: u32 },
    Special(&'static str),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::File { .. } => "file",
            Node::Link(_) => "symlink",
            Node::Dir { .. } => "directory",
            Node::Special(s) => s,
        }
    }
}

/// Every entry under `top` but `.git`, without following symlinks.
fn walk(top: &Path) -> Result<BTreeMap<Vec<u8>, Node>> {
    fn go(dir: &Path, rel: &[u8], out: &mut BTreeMap<Vec<u8>, Node>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name();
            if rel.is_empty() && name == ".git" {
                continue;
            }
            let r = join(rel, name.as_bytes());
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p)?;
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let node = if ft.is_symlink() {
                Node::Link(std::fs::read_link(&p)?.as_os_str().as_bytes().to_vec())
            } else if ft.is_dir() {
                go(&p, &r, out)?;
                Node::Dir {
                    owner: meta.mode() & 0o700,
                }
            } else if ft.is_file() {
                Node::File {
                    mode: meta.mode() & 0o777,
                    bytes: std::fs::read(&p)?,
                }
            } else if ft.is_fifo() {
                Node::Special("fifo")
            } else if ft.is_socket() {
                Node::Special("socket")
            } else {
                Node::Special("device")
            };
            out.insert(r, node);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    go(top, b"", &mut out)?;
    Ok(out)
}

/// One difference from a fresh clone: a kind (for grouping) and the details.
#[derive(Debug, Clone)]
struct Finding {
    kind: String,
    detail: String,
}

fn finding(kind: &str, detail: String) -> Finding {
    Finding {
        kind: kind.into(),
        detail,
    }
}

fn strip_cr(b: &[u8]) -> Vec<u8> {
    b.iter().copied().filter(|c| *c != b'\r').collect()
}

/// What a fresh clone + `git checkout --detach SHA` has: its `git ls-files -s` entries and
/// its work tree.
#[derive(Debug, PartialEq)]
struct Expected {
    index: BTreeSet<Vec<u8>>,
    tree: BTreeMap<Vec<u8>, Node>,
}

impl Expected {
    /// Read from a real fresh checkout in `dir`.
    fn from_checkout(dir: &Path) -> Result<Expected> {
        let index = git_raw(dir, &["ls-files", "-s", "-z"], None)?;
        Ok(Expected {
            index: split_nul(&index),
            tree: walk(dir)?,
        })
    }

    /// Computed from origin's objects without writing a file: `ls-tree`, and each blob
    /// through the filters a checkout applies, with the attributes of the commit itself
    /// (`--attr-source`). Files get the modes git gives them under this process's umask.
    /// Checked against [`Expected::from_checkout`] in every small case.
    fn from_git(origin: &Path, sha: &str) -> Result<Expected> {
        let umask = umask();
        let listing = git_raw(
            origin,
            &["ls-tree", "-r", "-t", "-z", "--full-tree", sha],
            None,
        )?;
        let mut index = BTreeSet::new();
        let mut tree = BTreeMap::new();
        let mut blobs: Vec<(Vec<u8>, Vec<u8>, u32)> = Vec::new();
        for rec in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let tab = rec
                .iter()
                .position(|b| *b == b'\t')
                .ok_or_else(|| anyhow!("bad ls-tree line {:?}", show(rec)))?;
            let (meta, path) = (&rec[..tab], rec[tab + 1..].to_vec());
            let fields: Vec<&[u8]> = meta.split(|b| *b == b' ').collect();
            let [mode, kind, oid] = fields[..] else {
                bail!("bad ls-tree line {:?}", show(rec));
            };
            match kind {
                b"tree" => {
                    tree.insert(path, Node::Dir { owner: 0o700 });
                }
                b"blob" => {
                    let mut line = mode.to_vec();
                    line.push(b' ');
                    line.extend_from_slice(oid);
                    line.extend_from_slice(b" 0\t");
                    line.extend_from_slice(&path);
                    index.insert(line);
                    let m = match mode {
                        b"100755" => 0o777 & !umask,
                        b"120000" => 0o120000,
                        _ => 0o666 & !umask,
                    };
                    blobs.push((oid.to_vec(), path, m));
                }
                other => bail!("unexpected {:?} in ls-tree", show(other)),
            }
        }
        // Every blob raw, then the one conversion these histories can need: a file with
        // `text` set (or unspecified) and `eol=crlf` gets CRLF line ends (blobs never hold a
        // CR, so every LF is converted). `check-attr` reads the attributes from the commit
        // itself (`--attr-source`), as a fresh checkout does.
        let mut input = Vec::new();
        for (oid, _, _) in &blobs {
            input.extend_from_slice(oid);
            input.push(b'\n');
        }
        let raw = parse_batch(&git_raw(origin, &["cat-file", "--batch"], Some(&input))?)?;
        let mut paths = Vec::new();
        for (_, path, _) in &blobs {
            paths.extend_from_slice(path);
            paths.push(0);
        }
        let attr = format!("--attr-source={sha}");
        let attrs = git_raw(
            origin,
            &[&attr, "check-attr", "-z", "--stdin", "text", "eol"],
            Some(&paths),
        )?;
        let mut crlf: BTreeMap<Vec<u8>, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        let parts: Vec<&[u8]> = attrs.split(|b| *b == 0).collect();
        for t in parts.chunks(3).filter(|t| t.len() == 3) {
            let e = crlf.entry(t[0].to_vec()).or_default();
            match t[1] {
                b"text" => e.0 = t[2].to_vec(),
                b"eol" => e.1 = t[2].to_vec(),
                _ => {}
            }
        }
        if raw.len() != blobs.len() {
            bail!("cat-file gave {} blobs for {}", raw.len(), blobs.len());
        }
        for ((_, path, mode), bytes) in blobs.into_iter().zip(raw) {
            if mode == 0o120000 {
                tree.insert(path, Node::Link(bytes));
                continue;
            }
            let (text, eol) = crlf.get(&path).cloned().unwrap_or_default();
            let convert = (text == b"set" || text == b"unspecified") && eol == b"crlf";
            let bytes = if convert {
                bytes
                    .iter()
                    .flat_map(|b| {
                        if *b == b'\n' {
                            vec![b'\r', b'\n']
                        } else {
                            vec![*b]
                        }
                    })
                    .collect()
            } else {
                bytes
            };
            tree.insert(path, Node::File { mode, bytes });
        }
        Ok(Expected { index, tree })
    }
}

fn split_nul(bytes: &[u8]) -> BTreeSet<Vec<u8>> {
    bytes
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The contents in `git cat-file --batch` output, in order.
fn parse_batch(mut out: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut contents = Vec::new();
    while !out.is_empty() {
        let nl = out
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| anyhow!("cat-file: no header"))?;
        let header = show(&out[..nl]);
        let size: usize = header
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("cat-file header {header:?}"))?;
        let body = out
            .get(nl + 1..nl + 1 + size)
            .ok_or_else(|| anyhow!("cat-file: short body"))?;
        contents.push(body.to_vec());
        out = out.get(nl + 2 + size..).unwrap_or(&[]);
    }
    Ok(contents)
}

/// This process's umask, from /proc (setting it to read it would race other threads).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Fails (a fault of this test, not of the engine) unless the computed expectation is what
/// a real fresh checkout holds.
fn oracle_matches(computed: &Expected, real: &Expected) -> Result<()> {
    if computed == real {
        return Ok(());
    }
    let mut diff = Vec::new();
    for (k, v) in &real.tree {
        if computed.tree.get(k) != Some(v) {
            diff.push(format!(
                "{}: fresh {:?}, computed {:?}",
                show(k),
                v,
                computed.tree.get(k)
            ));
        }
    }
    for k in computed.tree.keys().filter(|k| !real.tree.contains_key(*k)) {
        diff.push(format!("{}: only computed", show(k)));
    }
    if computed.index != real.index {
        diff.push("the index entries differ".into());
    }
    diff.truncate(5);
    bail!("test bug: the computed checkout differs from a real fresh checkout: {diff:#?}")
}

/// Compares the clone with what a fresh clone of `sha` has.
fn compare(clone: &Path, want: &Expected, sha: &str) -> Result<Vec<Finding>> {
    let mut found = Vec::new();
    // HEAD
    match git(clone, &["rev-parse", "HEAD"]) {
        Ok(h) if h == sha => {}
        Ok(h) => found.push(finding("HEAD is not the commit", format!("HEAD {h}"))),
        Err(e) => found.push(finding("HEAD unreadable", e.to_string())),
    }
    if git(clone, &["symbolic-ref", "-q", "HEAD"]).is_ok() {
        found.push(finding("HEAD not detached", String::new()));
    }
    // The index
    match git_raw(clone, &["ls-files", "-s", "-z"], None) {
        Ok(o) => {
            let a = split_nul(&o);
            if a != want.index {
                let only_ours: Vec<String> =
                    a.difference(&want.index).take(5).map(|x| show(x)).collect();
                let only_theirs: Vec<String> =
                    want.index.difference(&a).take(5).map(|x| show(x)).collect();
                found.push(finding(
                    "git ls-files -s differs",
                    format!(
                        "only in the clone: {only_ours:?}; only in a fresh clone: {only_theirs:?}"
                    ),
                ));
            }
        }
        Err(e) => found.push(finding("git ls-files fails", e.to_string())),
    }
    // The work tree
    let a = walk(clone)?;
    let b = &want.tree;
    let mut diffs = 0;
    for (path, theirs) in b {
        let p = show(path);
        match a.get(path) {
            None => found.push(finding("missing from the clone", p)),
            Some(ours) if ours == theirs => continue,
            Some(ours) if ours.kind() != theirs.kind() => found.push(finding(
                "wrong type",
                format!(
                    "{p}: {} in the clone, {} in a fresh clone",
                    ours.kind(),
                    theirs.kind()
                ),
            )),
            Some(Node::File {
                mode: m1,
                bytes: b1,
            }) => {
                let Node::File {
                    mode: m2,
                    bytes: b2,
                } = theirs
                else {
                    unreachable!("same kind")
                };
                if b1 != b2 {
                    let (kind, more) = if strip_cr(b1) == strip_cr(b2) {
                        ("line endings differ (stale CRLF/LF)", "")
                    } else {
                        ("file bytes differ", "")
                    };
                    found.push(finding(
                        kind,
                        format!(
                            "{p}: {} bytes in the clone, {} in a fresh clone{more}; clone {:?}, fresh {:?}",
                            b1.len(),
                            b2.len(),
                            show(&b1[..b1.len().min(40)]),
                            show(&b2[..b2.len().min(40)])
                        ),
                    ));
                }
                if m1 != m2 {
                    found.push(finding(
                        "file mode differs",
                        format!("{p}: {m1:o} in the clone, {m2:o} in a fresh clone"),
                    ));
                }
            }
            Some(Node::Link(t1)) => {
                let Node::Link(t2) = theirs else {
                    unreachable!("same kind")
                };
                found.push(finding(
                    "symlink target differs",
                    format!("{p}: {:?} vs {:?}", show(t1), show(t2)),
                ));
            }
            Some(Node::Dir { owner }) => found.push(finding(
                "directory the owner cannot use",
                format!("{p}: owner bits {owner:o}"),
            )),
            Some(other) => found.push(finding("odd entry", format!("{p}: {other:?}"))),
        }
        diffs += 1;
        if diffs > 20 {
            break;
        }
    }
    // Leftovers, with FIFOs and sockets apart: `git clean` does not see those.
    for (special, kind) in [
        (true, "FIFO or socket left in the clone"),
        (false, "left in the clone"),
    ] {
        let extra: Vec<String> = a
            .iter()
            .filter(|(k, n)| !b.contains_key(*k) && matches!(n, Node::Special(_)) == special)
            .take(10)
            .map(|(k, n)| format!("{} ({})", show(k), n.kind()))
            .collect();
        if !extra.is_empty() {
            found.push(finding(kind, extra.join(", ")));
        }
    }
    // git's own view
    match git_raw(clone, &["status", "--porcelain", "--ignored", "-z"], None) {
        Ok(s) if s.is_empty() => {}
        Ok(s) => found.push(finding(
            "git status --porcelain --ignored not empty",
            show(&s[..s.len().min(300)]).replace('\0', " | "),
        )),
        Err(e) => found.push(finding("git status fails", e.to_string())),
    }
    found.extend(objects_readable(clone, sha));
    Ok(found)
}

/// Every object reachable from `sha` can be read through the clone.
fn objects_readable(clone: &Path, sha: &str) -> Vec<Finding> {
    match git_raw(
        clone,
        &["rev-list", "--objects", "--missing=print", sha],
        None,
    ) {
        Ok(out) => {
            let missing: Vec<String> = out
                .split(|b| *b == b'\n')
                .filter(|l| l.first() == Some(&b'?'))
                .take(3)
                .map(show)
                .collect();
            if missing.is_empty() {
                Vec::new()
            } else {
                vec![finding(
                    "objects of the commit missing in the clone",
                    missing.join(", "),
                )]
            }
        }
        Err(e) => vec![finding(
            "objects of the commit unreadable in the clone",
            e.to_string(),
        )],
    }
}

/// A fresh checkout of `sha` into the empty directory `dir`, with an index of its own: what
/// `git clone` + `git checkout --detach SHA` writes. It is made as a worktree of the origin
/// (a local `git clone` costs a few hundred milliseconds on a loaded machine, a worktree a
/// fraction), and removed with [`drop_fresh`] before origin is pruned again.
fn fresh_clone(origin: &Path, sha: &str, dir: &Path) -> Result<()> {
    let d = dir.display().to_string();
    git(origin, &["worktree", "add", "-q", "--detach", &d, sha])?;
    let status = git_raw(dir, &["status", "--porcelain", "--ignored", "-z"], None)?;
    if !status.is_empty() {
        bail!(
            "the generator made a history git itself does not check out cleanly: {}",
            show(&status).replace('\0', " | ")
        );
    }
    Ok(())
}

/// Removes a [`fresh_clone`].
fn drop_fresh(origin: &Path, dir: &Path) -> Result<()> {
    remove_all(dir);
    git(origin, &["worktree", "prune"])?;
    Ok(())
}

/// Makes everything under `dir` writable again (steps' `chmod 000`), then removes it.
fn remove_all(dir: &Path) {
    fn open_up(p: &Path) {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.is_dir() {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
                if let Ok(rd) = std::fs::read_dir(p) {
                    for e in rd.flatten() {
                        open_up(&e.path());
                    }
                }
            }
        }
    }
    open_up(dir);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------
// Junk a step leaves

/// What the clone's work tree holds now (not `.git`): files and symlinks, directories.
fn current(clone: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    if let Ok(all) = walk(clone) {
        for (k, n) in all {
            let p = clone.join(path_of(&k));
            match n {
                Node::Dir { .. } => dirs.push(p),
                _ => files.push(p),
            }
        }
    }
    (files, dirs)
}

fn force_remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => remove_all(p),
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Whether the work tree (not `.git`) holds a FIFO anywhere.
fn has_fifo(dir: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(ft) = e.file_type() else {
            return false;
        };
        if ft.is_fifo() {
            return true;
        }
        ft.is_dir() && e.file_name() != ".git" && has_fifo(&e.path())
    })
}

fn mkfifo(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    unsafe { libc::mkfifo(c.as_ptr(), 0o644) == 0 }
}

fn set_mode(p: &Path, mode: u32) {
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

/// Leaves one random piece of junk in the clone, as a step might; returns what.
/// `light`: nothing that makes the next checkout rewrite every file (for the big case, on
/// a machine where writing thousands of files takes seconds).
fn junk(rng: &mut Rng, clone: &Path, outside: &Path, light: bool) -> String {
    let (files, dirs) = current(clone);
    let any_dir = |rng: &mut Rng| -> PathBuf {
        if dirs.is_empty() || rng.chance(1, 4) {
            clone.to_path_buf()
        } else {
            rng.pick(&dirs).clone()
        }
    };
    let rel = |p: &Path| p.strip_prefix(clone).unwrap_or(p).display().to_string();
    match rng.below(17) {
        0 => {
            let d = any_dir(rng).join(format!("untracked-{}", rng.below(1000)));
            if rng.chance(1, 2) {
                let _ = std::fs::create_dir_all(d.join("deeper/still"));
                let _ = std::fs::write(d.join("deeper/still/f"), b"junk");
            } else {
                let _ = std::fs::write(&d, b"junk");
            }
            format!("untracked {}", rel(&d))
        }
        1 => {
            let d = any_dir(rng);
            let p = match rng.below(3) {
                0 => d.join("junk.log"),
                1 => clone.join("ignored-thing"),
                _ => {
                    let b = clone.join("build/out");
                    let _ = std::fs::create_dir_all(&b);
                    b.join("x.o")
                }
            };
            let _ = std::fs::write(&p, b"ignored junk");
            format!("ignored {}", rel(&p))
        }
        2 | 3 => {
            // A FIFO in place of a tracked file, or a new one.
            let p = if !files.is_empty() && rng.chance(2, 3) {
                let f = rng.pick(&files).clone();
                force_remove(&f);
                f
            } else {
                any_dir(rng).join("new-fifo")
            };
            mkfifo(&p);
            format!("fifo {}", rel(&p))
        }
        4 => {
            let p = if !files.is_empty() && rng.chance(1, 2) {
                let f = rng.pick(&files).clone();
                force_remove(&f);
                f
            } else {
                any_dir(rng).join("sock")
            };
            // Paths longer than sun_path are skipped.
            let ok = std::os::unix::net::UnixListener::bind(&p).is_ok();
            format!(
                "socket {} ({})",
                rel(&p),
                if ok { "made" } else { "too long" }
            )
        }
        5 => {
            let d = any_dir(rng);
            if d == clone {
                return "nothing".into();
            }
            let _ = std::fs::write(d.join("inside-000"), b"x");
            set_mode(&d, 0o000);
            format!("chmod 000 {}", rel(&d))
        }
        6 => {
            let d = any_dir(rng);
            if d == clone {
                return "nothing".into();
            }
            let _ = std::fs::write(d.join("inside-ro"), b"x");
            set_mode(&d, 0o555);
            format!("chmod 555 {}", rel(&d))
        }
        7 => {
            // A symlink to outside the clone, in place of a directory or a file, or new.
            let target = if rng.chance(1, 2) {
                outside.to_path_buf()
            } else {
                outside.join("sentinel.txt")
            };
            let p = if !dirs.is_empty() && rng.chance(1, 2) {
                let d = rng.pick(&dirs).clone();
                force_remove(&d);
                d
            } else if !files.is_empty() && rng.chance(1, 2) {
                let f = rng.pick(&files).clone();
                force_remove(&f);
                f
            } else {
                any_dir(rng).join("escape")
            };
            let _ = std::os::unix::fs::symlink(&target, &p);
            format!("symlink {} -> {}", rel(&p), target.display())
        }
        8 | 9 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            // An earlier junk of this round may have made it a FIFO: opening that blocks.
            let regular = std::fs::symlink_metadata(&f).is_ok_and(|m| m.is_file());
            if let Some(mut b) = regular.then(|| std::fs::read(&f).ok()).flatten() {
                if !b.is_empty() && rng.chance(1, 2) {
                    // Same size, same second: only the content tells.
                    let i = rng.below(b.len());
                    b[i] = if b[i] == b'Z' { b'Y' } else { b'Z' };
                } else {
                    b.extend_from_slice(b"more");
                }
                let _ = std::fs::write(&f, &b);
            }
            format!("modified {}", rel(&f))
        }
        10 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            force_remove(&f);
            format!("deleted {}", rel(&f))
        }
        11 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            if let Ok(m) = std::fs::symlink_metadata(&f) {
                if m.is_file() {
                    set_mode(&f, m.mode() ^ 0o111);
                }
            }
            format!("chmod +-x {}", rel(&f))
        }
        12 if !files.is_empty() => {
            let f = rng.pick(&files).clone();
            force_remove(&f);
            let _ = std::fs::create_dir_all(f.join("sub"));
            let _ = std::fs::write(f.join("sub/file"), b"x");
            format!("file -> dir {}", rel(&f))
        }
        13 if !dirs.is_empty() => {
            let d = rng.pick(&dirs).clone();
            force_remove(&d);
            let _ = std::fs::write(&d, b"was a dir");
            format!("dir -> file {}", rel(&d))
        }
        14 => {
            let _ = std::fs::write(clone.join(".git/index.lock"), b"");
            "stale .git/index.lock".into()
        }
        // git opens a FIFO that stands where a tracked file was, and waits for ever: a
        // step's commit is only made when an earlier junk of this round made none.
        15 if !has_fifo(clone) => {
            let r = git(
                clone,
                &[
                    "commit",
                    "-qam",
                    "a step's commit",
                    "--allow-empty",
                    "--no-verify",
                ],
            );
            let b = git(clone, &["checkout", "-q", "-B", "step-branch"]);
            format!("commit in the clone ({:?}, {:?})", r.is_ok(), b.is_ok())
        }
        _ => match if light { 1 } else { rng.below(3) } {
            0 => {
                let _ = std::fs::remove_file(clone.join(".git/index"));
                "deleted .git/index".into()
            }
            1 => {
                let _ = std::fs::write(clone.join(".git/HEAD"), b"garbage\n");
                "garbage in .git/HEAD".into()
            }
            _ => {
                let _ = git(
                    clone,
                    &["update-index", "--assume-unchanged", "--", ".gitignore"],
                );
                let _ = std::fs::write(clone.join(".gitignore"), b"*\n");
                ".gitignore assume-unchanged and rewritten".into()
            }
        },
    }
}

// ---------------------------------------------------------------------------------------
// A case

#[derive(Clone, Copy, Debug)]
struct Size {
    files: usize,
    steps: usize,
    mutations_per_commit: usize,
}

const SMALL: Size = Size {
    files: 25,
    steps: 8,
    mutations_per_commit: 4,
};

const BIG: Size = Size {
    files: 3000,
    steps: 4,
    mutations_per_commit: 40,
};

/// What one case found: (kind, first detail with where it happened, how many times).
type Found = BTreeMap<String, (String, usize)>;

fn record(found: &mut Found, seed: u64, step: usize, context: &str, fs: Vec<Finding>) {
    for f in fs {
        let e = found.entry(f.kind).or_insert_with(|| {
            (
                format!("seed {seed}, step {step}: {}\n      {context}", f.detail),
                0,
            )
        });
        e.1 += 1;
    }
}

/// Files outside the clone that symlinks in the history and junk point at.
fn make_outside(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("keep"))?;
    std::fs::write(dir.join("sentinel.txt"), b"outside")?;
    std::fs::write(dir.join("keep/x"), b"outside too")?;
    Ok(())
}

fn outside_intact(dir: &Path) -> Vec<Finding> {
    let ok = std::fs::read(dir.join("sentinel.txt")).ok().as_deref() == Some(&b"outside"[..])
        && std::fs::read(dir.join("keep/x")).ok().as_deref() == Some(&b"outside too"[..]);
    if ok {
        Vec::new()
    } else {
        vec![finding(
            "files outside the clone changed (followed a symlink)",
            dir.display().to_string(),
        )]
    }
}

fn run_case(seed: u64, size: Size, found: &mut Found) -> Result<()> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let tmp = tempfile::Builder::new().prefix("tinyci-diff-").tempdir()?;
    let outside = tmp.path().join("outside");
    make_outside(&outside)?;
    let mut origin = Origin::create(&tmp.path().join("origin.git"))?;
    let mut tree = initial_tree(&mut rng, size.files, &outside);
    let first = origin.commit(&tree, None, seed)?;
    let clone = tmp.path().join("clone");
    let url = if rng.chance(1, 2) {
        origin.dir.display().to_string()
    } else {
        format!("file://{}", origin.dir.display())
    };
    git(tmp.path(), &["clone", "-q", &url, "clone"])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let mut ws = Workspace::open(&clone, WorkspaceOptions::default())
        .map_err(|e| anyhow!("Workspace::open: {e}"))?;
    let mut head = first.clone();
    let mut tip = 0usize;
    for step in 0..size.steps {
        let t_step = Instant::now();
        let mut log: Vec<String> = Vec::new();
        // Origin moves on, or is repacked, or rewound and pruned.
        match rng.below(10) {
            0 if tip > 0 => {
                // Live commits are exactly the ancestors of the tip (the history is linear).
                let older: Vec<usize> = (0..tip).filter(|i| origin.commits[*i].2).collect();
                let keep = *rng.pick(&older);
                origin.rewind_and_prune(keep)?;
                tip = keep;
                tree = origin.commits[keep].1.clone();
                log.push(format!("origin rewound to commit {keep} and pruned"));
                // What the clone has checked out must stay readable through it.
                let lost = objects_readable(&clone, &head);
                record(found, seed, step, "after origin pruned", lost);
            }
            1 => {
                git(&origin.dir, &["repack", "-q", "-a", "-d"])?;
                git(&origin.dir, &["prune-packed"])?;
                log.push("origin repacked".into());
            }
            _ => {}
        }
        let target = if rng.chance(3, 4) || tip == 0 {
            let muts: Vec<String> = (0..rng.below(size.mutations_per_commit) + 1)
                .map(|_| mutate(&mut rng, &mut tree, &outside))
                .collect();
            let parent = origin.commits[tip].0.clone();
            let sha = origin.commit(&tree, Some(&parent), seed)?;
            tip = origin.commits.len() - 1;
            log.push(format!("new commit: {}", muts.join("; ")));
            sha
        } else {
            // An earlier commit still on origin.
            let live: Vec<usize> = (0..origin.commits.len())
                .filter(|i| origin.commits[*i].2)
                .collect();
            let i = *rng.pick(&live);
            log.push(format!("earlier commit {i}"));
            origin.commits[i].0.clone()
        };
        // A step's junk.
        for _ in 0..rng.below(5) {
            log.push(format!(
                "junk: {}",
                junk(&mut rng, &clone, &outside, size.files > 200)
            ));
        }
        let context = log.join("\n      ");
        let commit = CommitId::parse(&target).map_err(|e| anyhow!("{e}"))?;
        let t_prepare = Instant::now();
        let prepared = rt.block_on(ws.prepare(&commit, &cancel));
        let t_prepare = t_prepare.elapsed();
        if let Err(e) = prepared {
            record(
                found,
                seed,
                step,
                &context,
                vec![finding("prepare failed", e.to_string())],
            );
            continue;
        }
        // What a fresh clone has: computed, and (in small cases, and once in the big one)
        // checked against a real fresh checkout.
        let t_fresh = Instant::now();
        let want = Expected::from_git(&origin.dir, &target)?;
        if size.files <= 200 || step + 1 == size.steps {
            let reference = tmp.path().join(format!("fresh-{step}"));
            fresh_clone(&origin.dir, &target, &reference)?;
            let real = Expected::from_checkout(&reference)?;
            drop_fresh(&origin.dir, &reference)?;
            oracle_matches(&want, &real).with_context(|| format!("seed {seed} step {step}"))?;
        }
        let t_fresh = t_fresh.elapsed();
        let t_cmp = Instant::now();
        let mut fs = compare(&clone, &want, &target)?;
        let t_cmp = t_cmp.elapsed();
        fs.extend(outside_intact(&outside));
        record(found, seed, step, &context, fs);
        if std::env::var_os("TINYCI_DIFF_VERBOSE").is_some() {
            eprintln!("step {step}: prepare {t_prepare:?}, fresh {t_fresh:?}, compare {t_cmp:?}, total {:?}\n      {context}", t_step.elapsed());
        }
        head = target;
    }
    drop(ws);
    remove_all(&clone);
    eprintln!(
        "case seed {seed} ({} files, {} steps): {:?}",
        size.files,
        size.steps,
        started.elapsed()
    );
    Ok(())
}

fn base_seed() -> u64 {
    match std::env::var("TINYCI_DIFF_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            panic!("TINYCI_DIFF_SEED must be a number, not {s:?}");
        }),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1),
    }
}

fn cases() -> usize {
    std::env::var("TINYCI_DIFF_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4)
}

fn run_cases(name: &str, size: Size, count: usize) -> Result<()> {
    let base = base_seed();
    eprintln!(
        "{name}: base seed {base}; replay a case with TINYCI_DIFF_SEED=<its seed> TINYCI_DIFF_CASES=1"
    );
    let mut found = Found::new();
    for i in 0..count {
        let seed = base + i as u64;
        eprintln!("{name}: case {i}, seed {seed}");
        run_case(seed, size, &mut found).with_context(|| format!("case seed {seed}"))?;
    }
    if found.is_empty() {
        return Ok(());
    }
    let mut report = format!(
        "{name}: the clone differed from a fresh clone ({} kinds of difference):\n",
        found.len()
    );
    for (kind, (first, n)) in &found {
        let _ = writeln!(report, "  - {kind} ({n}x); first: {first}");
    }
    bail!("{report}")
}

#[test]
fn random_histories_and_junk_check_out_like_a_fresh_clone() -> Result<()> {
    run_cases("small", SMALL, cases())
}

#[test]
fn a_history_of_thousands_of_files_checks_out_like_a_fresh_clone() -> Result<()> {
    run_cases("big", BIG, cases().div_ceil(4).max(1))
}

// ---------------------------------------------------------------------------------------
// Fixed histories for the subtle cases, so their findings have names of their own

/// Prepares each of `trees` in turn (as commits of one history) and compares each time.
fn fixed_history(trees: &[Tree]) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-diff-").tempdir()?;
    let mut origin = Origin::create(&tmp.path().join("origin.git"))?;
    let mut parent: Option<String> = None;
    for t in trees {
        parent = Some(origin.commit(t, parent.as_deref(), 0)?);
    }
    let first = origin.commits[0].0.clone();
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            "--no-checkout",
            &origin.dir.display().to_string(),
            "clone",
        ],
    )?;
    let clone = tmp.path().join("clone");
    git(&clone, &["checkout", "-q", "--detach", &first])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let mut ws = Workspace::open(&clone, WorkspaceOptions::default())
        .map_err(|e| anyhow!("Workspace::open: {e}"))?;
    let mut report = String::new();
    for (i, (sha, _, _)) in origin.commits.clone().iter().enumerate() {
        let commit = CommitId::parse(sha).map_err(|e| anyhow!("{e}"))?;
        rt.block_on(ws.prepare(&commit, &cancel))
            .map_err(|e| anyhow!("prepare commit {i}: {e}"))?;
        let reference = tmp.path().join(format!("fresh-{i}"));
        fresh_clone(&origin.dir, sha, &reference)?;
        let want = Expected::from_checkout(&reference)?;
        oracle_matches(&Expected::from_git(&origin.dir, sha)?, &want)?;
        for f in compare(&clone, &want, sha)? {
            let _ = writeln!(report, "commit {i}: {}: {}", f.kind, f.detail);
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        bail!("{report}")
    }
}

fn file(bytes: &[u8]) -> Entry {
    Entry::File {
        bytes: bytes.to_vec(),
        exec: false,
    }
}

fn tree_of(entries: &[(&[u8], Entry)]) -> Tree {
    entries
        .iter()
        .map(|(p, e)| (p.to_vec(), e.clone()))
        .collect()
}

#[test]
fn changing_only_a_gitattributes_rewrites_the_files_it_covers() -> Result<()> {
    let body = b"one\ntwo\n";
    fixed_history(&[
        tree_of(&[
            (b"sub/.gitattributes", file(b"*.txt text eol=crlf\n")),
            (b"sub/a.txt", file(body)),
            (b"sub/deeper/b.txt", file(body)),
        ]),
        tree_of(&[
            (b"sub/.gitattributes", file(b"*.txt -text\n")),
            (b"sub/a.txt", file(body)),
            (b"sub/deeper/b.txt", file(body)),
        ]),
        tree_of(&[
            (b"sub/a.txt", file(body)),
            (b"sub/deeper/b.txt", file(body)),
            (b"sub/deeper/.gitattributes", file(b"* text eol=crlf\n")),
        ]),
    ])
}

#[test]
fn file_symlink_and_directory_swap_places() -> Result<()> {
    fixed_history(&[
        tree_of(&[(b"x", file(b"file\n")), (b"y/z", file(b"in dir\n"))]),
        tree_of(&[
            (b"x/inner", file(b"now a dir\n")),
            (b"y", Entry::Link(b"x".to_vec())),
        ]),
        tree_of(&[
            (b"x", Entry::Link(b"/etc/passwd".to_vec())),
            (
                b"y",
                Entry::File {
                    bytes: b"exec\n".to_vec(),
                    exec: true,
                },
            ),
        ]),
        tree_of(&[
            (b"x", file(b"file again\n")),
            (b"y/z", file(b"dir again\n")),
        ]),
    ])
}

#[test]
fn objects_of_the_checked_out_commit_survive_origin_pruning() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("tinyci-diff-").tempdir()?;
    let mut origin = Origin::create(&tmp.path().join("origin.git"))?;
    let a = origin.commit(&tree_of(&[(b"a.txt", file(b"a\n"))]), None, 1)?;
    git(
        tmp.path(),
        &["clone", "-q", &origin.dir.display().to_string(), "clone"],
    )?;
    let clone = tmp.path().join("clone");
    let b = origin.commit(
        &tree_of(&[(b"a.txt", file(b"a\n")), (b"b.txt", file(b"only in b\n"))]),
        Some(&a),
        1,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let mut ws = Workspace::open(&clone, WorkspaceOptions::default())
        .map_err(|e| anyhow!("Workspace::open: {e}"))?;
    let cb = CommitId::parse(&b).map_err(|e| anyhow!("{e}"))?;
    rt.block_on(ws.prepare(&cb, &cancel))
        .map_err(|e| anyhow!("prepare: {e}"))?;
    // A force-push drops b from origin, and origin collects its garbage — while a job
    // could be running b in the clone.
    origin.rewind_and_prune(0)?;
    let mut report = String::new();
    for f in objects_readable(&clone, &b) {
        let _ = writeln!(report, "{}: {}", f.kind, f.detail);
    }
    if let Err(e) = git(&clone, &["status", "--porcelain"]) {
        let _ = writeln!(report, "git status in the clone fails: {e}");
    }
    if let Err(e) = git(&clone, &["log", "-1", "--stat"]) {
        let _ = writeln!(report, "git log in the clone fails: {e}");
    }
    // And the clone goes on to the next commit.
    let ca = CommitId::parse(&a).map_err(|e| anyhow!("{e}"))?;
    match rt.block_on(ws.prepare(&ca, &cancel)) {
        Ok(_) => {
            let reference = tmp.path().join("fresh");
            fresh_clone(&origin.dir, &a, &reference)?;
            let want = Expected::from_checkout(&reference)?;
            for f in compare(&clone, &want, &a)? {
                let _ = writeln!(report, "after going back to a: {}: {}", f.kind, f.detail);
            }
        }
        Err(e) => {
            let _ = writeln!(report, "prepare(a) after the prune: {e}");
        }
    }
    if report.is_empty() {
        Ok(())
    } else {
        bail!("after origin pruned the checked-out commit:\n{report}")
    }
}

#[test]
fn the_checker_sees_a_clone_left_as_the_step_left_it() -> Result<()> {
    // The oracle must not be blind: junk that no checkout removed is reported.
    let tmp = tempfile::Builder::new().prefix("tinyci-diff-").tempdir()?;
    let mut origin = Origin::create(&tmp.path().join("origin.git"))?;
    let a = origin.commit(
        &tree_of(&[
            (b"a.txt", file(b"a\n")),
            (b"sub/.gitattributes", file(b"*.txt text eol=crlf\n")),
            (b"sub/c.txt", file(b"c\n")),
        ]),
        None,
        2,
    )?;
    git(
        tmp.path(),
        &["clone", "-q", &origin.dir.display().to_string(), "clone"],
    )?;
    let clone = tmp.path().join("clone");
    let reference = tmp.path().join("fresh");
    fresh_clone(&origin.dir, &a, &reference)?;
    git(&clone, &["checkout", "-q", "--detach", &a])?;
    let want = Expected::from_checkout(&reference)?;
    oracle_matches(&Expected::from_git(&origin.dir, &a)?, &want)?;
    if !compare(&clone, &want, &a)?.is_empty() {
        bail!("a plain checkout differs from a fresh clone");
    }
    std::fs::write(clone.join("a.txt"), b"b\n")?;
    mkfifo(&clone.join("fifo"));
    std::fs::write(clone.join("untracked.txt"), b"u\n")?;
    std::fs::write(clone.join("sub/c.txt"), b"c\n")?;
    set_mode(&clone.join("sub"), 0o000);
    let kinds: BTreeSet<String> = compare(&clone, &want, &a)?
        .into_iter()
        .map(|f| f.kind)
        .collect();
    set_mode(&clone.join("sub"), 0o755);
    for want in [
        "file bytes differ",
        "FIFO or socket left in the clone",
        "left in the clone",
        "line endings differ (stale CRLF/LF)",
        "directory the owner cannot use",
        "git status --porcelain --ignored not empty",
    ] {
        if !kinds.contains(want) {
            bail!("the checker missed {want:?}; it saw {kinds:?}");
        }
    }
    Ok(())
}
