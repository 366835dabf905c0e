//! The memory budget a user gives (`--memory-budget SIZE` or the environment), resolved once per
//! process; it replaces the detection of available memory.

use std::ffi::OsStr;
use std::sync::OnceLock;

use anyhow::{Context, Result};

use super::size::Size;

/// The environment variable that sets the memory budget when `--memory-budget` is not given.
pub const BUDGET_ENV: &str = "FLUXFLOW_MEMORY_BUDGET";

/// Where a memory budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--memory-budget`.
    Flag,
    /// [`BUDGET_ENV`].
    Env,
}

/// A memory budget that replaces the detection of available memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub size: Size,
    pub source: BudgetSource,
}

impl Budget {
    /// The budget from `--memory-budget` (`flag`) or else from the value of [`BUDGET_ENV`]
    /// (`env`); none when neither is given. A bad value of the variable is an error naming it.
    pub fn resolve(flag: Option<Size>, env: Option<&OsStr>) -> Result<Option<Self>> {
        if let Some(size) = flag {
            return Ok(Some(Self {
                size,
                source: BudgetSource::Flag,
            }));
        }
        let Some(v) = env else {
            return Ok(None);
        };
        let text = v
            .to_str()
            .with_context(|| format!("{BUDGET_ENV}={v:?} is not valid UTF-8"))?;
        let size = Size::parse(text).with_context(|| format!("{BUDGET_ENV}={text}"))?;
        Ok(Some(Self {
            size,
            source: BudgetSource::Env,
        }))
    }

    /// The budget as the user gave it, e.g. `--memory-budget 8G`.
    pub fn describe(&self) -> String {
        match self.source {
            BudgetSource::Flag => format!("--memory-budget {}", self.size.text),
            BudgetSource::Env => format!("{BUDGET_ENV}={}", self.size.text),
        }
    }
}

static BUDGET: OnceLock<Option<Budget>> = OnceLock::new();

/// Sets this process's memory budget from `--memory-budget` (`flag`, which wins) and
/// [`BUDGET_ENV`]; with neither, [`super::check_fits`] detects the available memory. Called once, at
/// start-up, before any check: a second call is an error.
pub fn init_budget(flag: Option<Size>) -> Result<Option<Budget>> {
    let budget = Budget::resolve(flag, std::env::var_os(BUDGET_ENV).as_deref())?;
    BUDGET
        .set(budget.clone())
        .map_err(|_| anyhow::anyhow!("the memory budget was already set for this process"))?;
    Ok(budget)
}

/// The process's budget: [`init_budget`]'s, or, where it was not called (the library used on
/// its own), [`BUDGET_ENV`]'s.
pub fn process_budget() -> Result<Option<Budget>> {
    if let Some(b) = BUDGET.get() {
        return Ok(b.clone());
    }
    let b = Budget::resolve(None, std::env::var_os(BUDGET_ENV).as_deref())?;
    Ok(BUDGET.get_or_init(|| b).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment_and_a_bad_variable_is_named() {
        let flag = Size::parse("1G").unwrap();
        let b = Budget::resolve(Some(flag.clone()), Some(OsStr::new("junk"))).unwrap();
        assert_eq!(b.unwrap().source, BudgetSource::Flag);
        let b = Budget::resolve(None, Some(OsStr::new("2GiB")))
            .unwrap()
            .unwrap();
        assert_eq!((b.size.bytes, b.source), (2 << 30, BudgetSource::Env));
        assert_eq!(Budget::resolve(None, None).unwrap(), None);
        let e = format!(
            "{:#}",
            Budget::resolve(None, Some(OsStr::new("lots"))).unwrap_err()
        );
        assert!(e.contains("FLUXFLOW_MEMORY_BUDGET=lots"), "{e}");
    }
}
