//! The retry policy of the upload destinations: how many attempts, the backoff between them,
//! and which failures are worth another attempt.
//!
//! An attempt that fails says whether a new one may succeed ([`Failure`]); the classification
//! is the one both destinations have always used:
//! - [`Failure::of`]: retryable when the error is UNAVAILABLE: a transport error (cannot
//!   connect, connection cut, timed out), a stall, or an answer whose status maps to
//!   UNAVAILABLE (5xx). A redirect (FAILED_PRECONDITION) and every other kind are final.
//! - [`Failure::answer`]: an error answer, retryable when its status is 5xx or 429.
//! - [`Failure::fatal`]: never retried (producer errors, verification mismatches, 4xx).
//!
//! [`RetryPolicy::run`] runs attempts until one succeeds, one fails for good, or the attempts
//! are used up, sleeping 1×, 2×, 4×, 8×, 16× the first backoff between them (at most 8 s).

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;

use super::is_transient_status;
use crate::error::{Error, ErrorKind};

/// A failed attempt: the error, and whether a new attempt may succeed.
pub(crate) struct Failure {
    pub error: Error,
    pub retryable: bool,
}

impl Failure {
    /// Retryable when the error is UNAVAILABLE.
    pub(crate) fn of(error: Error) -> Self {
        let retryable = error.kind() == ErrorKind::Unavailable;
        Failure { error, retryable }
    }

    /// Never retried.
    pub(crate) fn fatal(error: Error) -> Self {
        Failure {
            error,
            retryable: false,
        }
    }

    /// The error of an answer with `status`: retryable when the status is transient.
    pub(crate) fn answer(error: Error, status: StatusCode) -> Self {
        Failure {
            error,
            retryable: is_transient_status(status),
        }
    }
}

/// The last failure of [`RetryPolicy::run`]: `retryable` is true when it would have been
/// retried but the attempts were used up.
pub(crate) struct GaveUp {
    pub error: Error,
    pub retryable: bool,
    /// The attempt that failed last (1-based).
    pub attempt: u32,
    /// Attempts allowed in total.
    pub attempts: u32,
}

/// A retry about to happen, for the caller's log line.
pub(crate) struct Retry<'a> {
    /// The attempt that failed (1-based).
    pub attempt: u32,
    pub attempts: u32,
    pub error: &'a Error,
    /// The sleep before the next attempt.
    pub wait: Duration,
}

/// Attempts in total and the first backoff.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    attempts: u32,
    first_backoff: Duration,
}

impl RetryPolicy {
    /// `attempts` in total (at least one is made), sleeping `first_backoff` after the first
    /// failure and doubling.
    pub(crate) fn new(attempts: u32, first_backoff: Duration) -> Self {
        RetryPolicy {
            attempts,
            first_backoff,
        }
    }

    /// The sleep after failed attempt `attempt` (1-based): the first backoff, doubled each
    /// time up to 16×, at most 8 s.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(4);
        (self.first_backoff * factor).min(Duration::from_secs(8))
    }

    /// Runs `once(attempt)` (attempt 1-based) until it succeeds, fails for good, or the
    /// attempts are used up; `before_retry` is told of each retry before its sleep.
    pub(crate) async fn run<T, Fut>(
        &self,
        mut once: impl FnMut(u32) -> Fut,
        mut before_retry: impl FnMut(&Retry<'_>),
    ) -> Result<T, GaveUp>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = self.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match once(attempt).await {
                Ok(v) => return Ok(v),
                Err(f) if f.retryable && attempt < attempts => {
                    let wait = self.backoff(attempt);
                    before_retry(&Retry {
                        attempt,
                        attempts,
                        error: &f.error,
                        wait,
                    });
                    tokio::time::sleep(wait).await;
                }
                Err(f) => {
                    return Err(GaveUp {
                        error: f.error,
                        retryable: f.retryable,
                        attempt,
                        attempts,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::new(3, Duration::from_millis(500));
        assert_eq!(p.backoff(1), Duration::from_millis(500));
        assert_eq!(p.backoff(2), Duration::from_secs(1));
        assert_eq!(p.backoff(3), Duration::from_secs(2));
        assert_eq!(p.backoff(10), Duration::from_secs(8));
    }

    #[test]
    fn classification() {
        let unavailable = || Error::new(ErrorKind::Unavailable, "x");
        assert!(Failure::of(unavailable()).retryable);
        assert!(!Failure::of(Error::new(ErrorKind::FailedPrecondition, "x")).retryable);
        assert!(!Failure::fatal(unavailable()).retryable);
        for (status, retry) in [
            (StatusCode::INTERNAL_SERVER_ERROR, true),
            (StatusCode::SERVICE_UNAVAILABLE, true),
            (StatusCode::TOO_MANY_REQUESTS, true),
            (StatusCode::BAD_REQUEST, false),
            (StatusCode::FORBIDDEN, false),
        ] {
            assert_eq!(Failure::answer(unavailable(), status).retryable, retry);
        }
    }

    #[tokio::test]
    async fn run_retries_only_what_is_retryable_and_counts() {
        let p = RetryPolicy::new(3, Duration::from_millis(1));
        // Transient every time: three attempts, two retries told, then given up.
        let mut tries = 0;
        let mut told = Vec::new();
        let out: Result<(), GaveUp> = p
            .run(
                |a| {
                    tries += 1;
                    async move {
                        Err(Failure::of(Error::new(
                            ErrorKind::Unavailable,
                            format!("{a}"),
                        )))
                    }
                },
                |r| told.push((r.attempt, r.attempts, r.error.to_string())),
            )
            .await;
        let g = out.err().unwrap();
        assert_eq!((tries, g.attempt, g.attempts, g.retryable), (3, 3, 3, true));
        assert_eq!(told, vec![(1, 3, "1".into()), (2, 3, "2".into())]);
        // A final failure stops at once.
        let g = p
            .run(
                |_| async { Err::<(), _>(Failure::fatal(Error::new(ErrorKind::Internal, "no"))) },
                |_| panic!("no retry"),
            )
            .await
            .err()
            .unwrap();
        assert_eq!((g.attempt, g.retryable), (1, false));
        // A success after a retry.
        let v = p
            .run(
                |a| async move {
                    if a < 2 {
                        Err(Failure::of(Error::new(ErrorKind::Unavailable, "x")))
                    } else {
                        Ok(a)
                    }
                },
                |_| {},
            )
            .await
            .ok()
            .unwrap();
        assert_eq!(v, 2);
    }
}
