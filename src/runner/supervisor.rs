//! The per-step supervisor: a small process between the runner and a step's shell that
//! makes sure nothing of the step outlives the step — or the runner.
//!
//! ```text
//!   test_runner ──stdin pipe (control)──▶ supervisor ──▶ sh -e -c RUN ──▶ children, daemons…
//!   (async, threads)                       (one thread, child subreaper)   (own process group)
//! ```
//!
//! The runner starts it as `/proc/self/exe --tinyci-step-supervisor sh -e -c RUN` (the
//! runner's own binary in a hidden mode, see [`main_if_supervisor`]). The supervisor:
//!
//! - declares itself a *child subreaper* (`PR_SET_CHILD_SUBREAPER`), so every process the
//!   step forks stays its descendant even after its parent exits — a double fork, `nohup`
//!   or `setsid` does not escape (only reparenting to it, never past it);
//! - starts the shell in a process group of its own, with `PR_SET_PDEATHSIG(SIGKILL)` (safe
//!   here: the supervisor has a single thread, so "parent thread died" means "parent died");
//! - holds the read end of a pipe whose only write end is the runner's. End of file on it —
//!   the runner closed it, or the runner died, even by `kill -9` — means *kill everything now*:
//!   the supervisor SIGKILLs the shell's group and then every descendant it still has, reaps
//!   them, and exits. Nothing depends on the runner being alive to clean up;
//! - takes commands on the same pipe: `T` sends SIGTERM to the group and every descendant (a
//!   step's timeout), `K` kills everything like end of file;
//! - when the shell exits by itself, kills whatever the step left behind (background jobs,
//!   daemons) and exits with the shell's own status: the same exit code, or death by the
//!   same signal, so the runner reads the step's status from the supervisor's.
//!
//! `PR_SET_PDEATHSIG` on the supervisor itself is not used: it fires when the *thread* that
//! forked the child exits, and the runner's threads come and go (tokio's blocking pool).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The hidden first argument that turns the runner's binary into a step supervisor.
pub const ARG: &str = "--tinyci-step-supervisor";

/// The control byte that asks for SIGTERM to the whole step.
pub const TERMINATE: u8 = b'T';

/// The control byte that asks for SIGKILL to the whole step (as does closing the pipe).
pub const KILL: u8 = b'K';

/// How long the supervisor keeps killing a step's descendants before it gives up on
/// processes that do not die (stuck in the kernel, say) and exits anyway.
const KILL_DEADLINE: Duration = Duration::from_secs(5);

/// Exit code when the step's shell cannot be started (as a shell's "command not found").
const CANNOT_START: i32 = 127;

/// If this process was started as a step supervisor (its first argument is [`ARG`]), runs the
/// step and exits with its status; otherwise returns at once. Call it first thing in the
/// runner binary's `main`, before any thread (the tokio runtime) is started: the supervisor
/// relies on being single-threaded.
pub fn main_if_supervisor() {
    let mut args = std::env::args_os();
    let _exe = args.next();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(ARG)) {
        return;
    }
    let argv: Vec<OsString> = args.collect();
    let code = match supervise(&argv) {
        Ok(status) => exit_like(status),
        Err(e) => {
            eprintln!("[tinyci] step supervisor: {e}");
            CANNOT_START
        }
    };
    std::process::exit(code)
}

/// The signals the supervisor handles itself (through a signalfd), blocked from delivery.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
        ] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

/// Runs `argv` (program and arguments) under supervision; returns its raw wait status.
fn supervise(argv: &[OsString]) -> io::Result<libc::c_int> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("no command to supervise"))?;
    let set = handled_signals();
    // SAFETY: plain syscalls on values we own; the process is single-threaded here.
    let sfd = unsafe {
        // Named in `ps` and `top` (the kernel would call us `exe`, after /proc/self/exe).
        libc::prctl(libc::PR_SET_NAME, c"tinyci-step".as_ptr(), 0, 0, 0);
        check(
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0),
            "PR_SET_CHILD_SUBREAPER",
        )?;
        check(
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "sigprocmask",
        )?;
        check(
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK),
            "signalfd",
        )?
    };
    let me = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).process_group(0);
    // SAFETY: runs in the forked child before exec; prctl and getppid are async-signal-safe.
    // std resets the child's signal mask and SIGPIPE before exec, so the shell starts with
    // ordinary signal handling.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != me {
                // We died between fork and prctl: do not run unsupervised.
                return Err(io::Error::other("the supervisor is gone"));
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {program:?}: {e}")))?;
    let shell = child.id() as libc::pid_t;
    // We reap with waitpid(-1) ourselves; the handle is not needed (dropping it neither
    // kills nor waits).
    drop(child);

    let mut status: Option<libc::c_int> = None;
    while status.is_none() {
        let mut fds = [
            libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on an array we own.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Cannot wait for anything: the safe way out is to end the step.
            break;
        }
        if fds[0].revents != 0 {
            match read_control() {
                Control::Nothing => {}
                Control::Terminate => signal_everything(shell, libc::SIGTERM),
                Control::Kill => break,
            }
        }
        if fds[1].revents != 0 {
            let mut forward_term = false;
            for sig in read_signals(sfd) {
                if sig != libc::SIGCHLD {
                    forward_term = true;
                }
            }
            if forward_term {
                signal_everything(shell, libc::SIGTERM);
            }
            reap(shell, &mut status);
        }
    }
    // The shell is gone (or must go now): whatever the step left running goes with it.
    kill_everything(shell, &mut status);
    Ok(status.unwrap_or(libc::SIGKILL))
}

enum Control {
    Nothing,
    Terminate,
    Kill,
}

/// Reads what the runner sent on the control pipe (our stdin).
fn read_control() -> Control {
    let mut buf = [0u8; 64];
    // SAFETY: read(2) into a buffer we own.
    let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    if n == 0 {
        return Control::Kill; // the runner closed the pipe, or died
    }
    if n < 0 {
        return match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Control::Nothing,
            _ => Control::Kill,
        };
    }
    let bytes = &buf[..n as usize];
    if bytes.contains(&KILL) {
        Control::Kill
    } else if bytes.contains(&TERMINATE) {
        Control::Terminate
    } else {
        Control::Nothing
    }
}

/// Drains the signalfd; returns the signal numbers read.
fn read_signals(sfd: libc::c_int) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data; read(2) fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = unsafe { libc::read(sfd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        if n != size as isize {
            return out;
        }
        out.push(info.ssi_signo as libc::c_int);
    }
}

/// Reaps every child that has exited, noting the shell's status when it is among them.
/// Returns whether any child is left.
fn reap(shell: libc::pid_t, status: &mut Option<libc::c_int>) -> bool {
    loop {
        let mut st = 0;
        // SAFETY: waitpid(2) writing into a local.
        let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if pid == shell {
            *status = Some(st);
        } else if pid == 0 {
            return true; // children left, none exited yet
        } else if pid < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false; // ECHILD: no children at all
        }
    }
}

/// Sends `sig` to the shell's group and to every descendant (in the group or not).
fn signal_everything(shell: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) on the step's own group and on our descendants.
    unsafe {
        libc::kill(-shell, sig);
    }
    for pid in descendants(std::process::id() as libc::pid_t) {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGKILLs the shell's group and every descendant until none is left (or the deadline).
/// Every orphan of the step is reparented to us (we are a subreaper), so "no child left"
/// means "no descendant left".
fn kill_everything(shell: libc::pid_t, status: &mut Option<libc::c_int>) {
    let deadline = Instant::now() + KILL_DEADLINE;
    // SAFETY: kill(2) on the step's own process group.
    unsafe {
        libc::kill(-shell, libc::SIGKILL);
    }
    loop {
        if !reap(shell, status) {
            return;
        }
        for pid in descendants(std::process::id() as libc::pid_t) {
            // SAFETY: kill(2) on one of our descendants.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "[tinyci] step supervisor: some of the step's processes did not die within {KILL_DEADLINE:?}"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The live (non-zombie) descendants of `root`, from one scan of `/proc`.
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut parent_of: Vec<(libc::pid_t, libc::pid_t)> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat) {
            if state != 'Z' {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == p)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// The state letter and the parent pid of a `/proc/PID/stat` line (the command name, in
/// parentheses, may contain anything, so the fields are read after its last `)`).
fn parse_stat(stat: &str) -> Option<(char, libc::pid_t)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Turns the shell's wait status into our own exit: the same code, or death by the same
/// signal (no core dump of ours). Returns an exit code only when re-raising is impossible.
fn exit_like(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status);
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: plain syscalls; we are about to die by `sig`, as the shell did.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        return 128 + sig;
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parse_stat("42 (sh) S 7 42 42 0 -1 4194560"), Some(('S', 7)));
        assert_eq!(
            parse_stat("43 (a) b (c)) Z 9 1 1 0"),
            Some(('Z', 9)),
            "a name with spaces and parentheses"
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_of_this_process_include_grandchildren() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .spawn()
            .unwrap();
        // Other tests of this process start children too: look below our own child only.
        let sh = child.id() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = Vec::new();
        while Instant::now() < deadline {
            found = descendants(sh);
            if found.len() >= 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for pid in found.iter().chain([&sh]) {
            // SAFETY: kill(2) on the child we started and its descendants.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        let _ = child.wait();
        assert_eq!(found.len(), 2, "the shell's two sleeps: {found:?}");
    }
}
