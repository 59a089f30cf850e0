//! Crash points for failure tests: `marker --crash-at STEP --crash-once-file PATH` makes the
//! first replica of the group that reaches STEP abort on the spot (as `kill -9` would stop it),
//! after creating PATH so that the replica which takes over does not crash there too.
//!
//! Steps: `after-begin`, `after-reserve-1`, `after-reserve-2`, …, `after-decide`,
//! `between-posts`, `before-done`.

use std::path::PathBuf;
use std::sync::OnceLock;

static CRASH_AT: OnceLock<(String, PathBuf)> = OnceLock::new();

/// Arms the crash point; called once at start-up.
pub fn arm(step: String, once_file: PathBuf) {
    let _ = CRASH_AT.set((step, once_file));
}

/// Aborts the process if this is the armed step and no replica has crashed here yet. The step
/// is only formatted when a crash point is armed.
pub fn point(step: impl std::fmt::Display) {
    let Some((armed, once_file)) = CRASH_AT.get() else {
        return;
    };
    if *armed != step.to_string() {
        return;
    }
    // `create_new` fails when the file exists: only the first replica to get here crashes.
    if std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(once_file)
        .is_ok()
    {
        eprintln!("crash point {step}: aborting");
        std::process::abort();
    }
}
