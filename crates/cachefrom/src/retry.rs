//! Trying again, in one place: a value is made again while it asks for it, a bounded number of
//! times, with a wait that grows between tries. A manifest write a registry answered 5xx for a
//! moment, a cache export a registry refused while writers raced, a build that lost a race with
//! an identical one on the same engine: each is this, with its own test of "again".

use std::time::Duration;

/// How many further tries, and the waits before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Further tries after the first, at the most.
    pub retries: u32,
    /// The wait before the first retry; each later wait is `factor` times the one before.
    pub first: Duration,
    /// How much longer each wait is than the one before.
    pub factor: u32,
}

impl Backoff {
    /// The wait before retry `n` (0 for the first retry).
    pub fn wait(&self, n: u32) -> Duration {
        self.first * self.factor.saturating_pow(n)
    }
}

/// `first`, made again by `again(previous, n)` while `worth_it(&value)` and the backoff allows
/// (`n` counts the retries from 1). The last value made is returned, whatever it is.
pub fn while_worth<T, E>(
    first: Result<T, E>,
    backoff: Backoff,
    worth_it: impl Fn(&Result<T, E>) -> bool,
    mut again: impl FnMut(Result<T, E>, u32) -> Result<T, E>,
) -> Result<T, E> {
    let mut value = first;
    for n in 0..backoff.retries {
        if !worth_it(&value) {
            break;
        }
        std::thread::sleep(backoff.wait(n));
        value = again(value, n + 1);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_stop_at_success_at_the_limit_and_when_not_worth_it() {
        let quick = Backoff { retries: 2, first: Duration::from_millis(1), factor: 3 };
        let count = |fail_until: u32, worth: bool| {
            let mut calls = 1;
            let first: Result<(), u32> = if fail_until >= 1 { Err(1) } else { Ok(()) };
            let result = while_worth(
                first,
                quick,
                |value| value.is_err() && worth,
                |_, _| {
                    calls += 1;
                    if calls <= fail_until {
                        Err(calls)
                    } else {
                        Ok(())
                    }
                },
            );
            (calls, result.is_ok())
        };
        assert_eq!(count(1, true), (2, true));
        assert_eq!(count(9, true), (3, false));
        assert_eq!(count(9, false), (1, false));
        assert_eq!(count(0, true), (1, true));
        assert_eq!(quick.wait(0), Duration::from_millis(1));
        assert_eq!(quick.wait(2), Duration::from_millis(9));
    }
}
