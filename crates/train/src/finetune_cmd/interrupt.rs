//! Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (and SIGHUP; on Windows, Ctrl-C and
//! closing the console).
//!
//! Killing a process in the middle of a step would lose everything since the last checkpoint.
//! Instead, [`watch`] installs a handler (the `ctrlc` crate: a thread that waits on the signal,
//! so the handler runs no code in signal context) that only raises a flag. The training loop
//! looks at the flag with [`requested`] between steps: the step under way finishes, the
//! checkpoint is written as at any other save, and the command ends with [`Interrupted`], which
//! `main` turns into the message and exit status [`EXIT_CODE`] (130, the shell's code for a
//! process ended by SIGINT). `--resume` then continues exactly as after `--stop-after`.
//!
//! A second signal while the first is being honoured ends the process at once (status 130):
//! a user pressing Ctrl-C twice wants out now, and every file the run writes is replaced
//! atomically, so even then the last checkpoint stays whole.

use std::fmt;
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a run stopped by a signal: 128 + SIGINT, as shells report it.
pub const EXIT_CODE: i32 = 130;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Installs the handler (once per process; later calls do nothing). If the process already has
/// one (a host program's), says so on stderr and keeps it: signals then act as they did.
pub fn watch() {
    INSTALL.call_once(|| {
        let result = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting now (the last checkpoint is intact)");
                std::process::exit(EXIT_CODE);
            }
            eprintln!("interrupt: stopping after the current step and saving a checkpoint");
        });
        if let Err(e) = result {
            eprintln!("warning: Ctrl-C will not save a checkpoint ({e})");
        }
    });
}

/// Whether a signal asked the run to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error a run stopped by a signal ends with, once its checkpoint is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    /// Steps done (all saved in the checkpoint).
    pub step: u32,
    /// Steps of the whole run.
    pub total: u32,
    /// The checkpoint's directory.
    pub checkpoint: PathBuf,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted: stopped after step {} of {}, checkpoint saved in {}; run the same \
             command with --resume to continue",
            self.step,
            self.total,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}
