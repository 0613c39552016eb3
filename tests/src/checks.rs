//! Named checks of one expensive end-to-end run: the run records each check's result once,
//! and each `#[test]` asserts one of them, so one test-host boot serves many tests.

use std::collections::BTreeMap;

/// Each check's result, by name.
pub type Checks = BTreeMap<&'static str, Result<(), String>>;

/// What a run left: its checks, and the error that ended it early, if any.
#[derive(Debug)]
pub struct Run {
    pub checks: Checks,
    pub fatal: Option<String>,
}

impl Run {
    /// Run `f`, which records checks as it goes.
    pub fn of(f: impl FnOnce(&mut Checks) -> anyhow::Result<()>) -> Run {
        let mut checks = Checks::new();
        let fatal = f(&mut checks).err().map(|e| format!("{e:#}"));
        Run { checks, fatal }
    }

    /// Panic unless check `name` passed (saying why it failed or did not run).
    pub fn assert(&self, name: &str) {
        match self.checks.get(name) {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{name} failed: {e}"),
            None => panic!(
                "{name} did not run: {}",
                self.fatal.as_deref().unwrap_or("an earlier step failed")
            ),
        }
    }
}

/// Record check `name`'s result (and print a failure at once, for the log).
pub fn record(checks: &mut Checks, name: &'static str, r: anyhow::Result<()>) {
    if let Err(e) = &r {
        eprintln!("check {name} failed: {e:#}");
    }
    checks.insert(name, r.map_err(|e| format!("{e:#}")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_report_pass_failure_and_absence() {
        let run = Run::of(|c| {
            record(c, "good", Ok(()));
            record(c, "bad", Err(anyhow::anyhow!("it broke")));
            anyhow::bail!("stopped early")
        });
        run.assert("good");
        let bad = std::panic::catch_unwind(|| run.assert("bad")).unwrap_err();
        assert!(bad.downcast_ref::<String>().unwrap().contains("it broke"));
        let missing = std::panic::catch_unwind(|| run.assert("never")).unwrap_err();
        assert!(
            missing
                .downcast_ref::<String>()
                .unwrap()
                .contains("stopped early")
        );
    }
}
