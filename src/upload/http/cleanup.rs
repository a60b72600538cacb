//! The clean-up of an upload that did not finish: a half-made Glance image, an S3 multipart
//! upload. A destination puts what it made in a [`CleanupGuard`] as soon as it exists; when the
//! upload fails, the destination cleans up in line (and says so in the error) and disarms the
//! guard; when it succeeds, it disarms the guard. If the upload future is instead dropped while
//! the guard is armed (the operation was cancelled), the guard starts the clean-up as a task on
//! the runtime, since nothing can be awaited in a drop.

use std::ops::{Deref, DerefMut};

use futures_util::future::BoxFuture;

/// What a destination undoes when its upload is dropped unfinished.
pub(crate) trait Undo: Send + 'static {
    /// Logs that the upload was cancelled; called in the drop, before the clean-up starts.
    fn cancelled(&self);
    /// Logs that nothing could be cleaned up (dropped outside a runtime).
    fn stranded(&self);
    /// The clean-up, run as a task of its own.
    fn undo(&self) -> BoxFuture<'static, ()>;
}

/// Holds an [`Undo`] and runs it if dropped while armed. The guarded state is reachable
/// through it (`Deref`), so the destination keeps it up to date as the upload goes on.
pub(crate) struct CleanupGuard<U: Undo> {
    made: U,
    armed: bool,
}

impl<U: Undo> CleanupGuard<U> {
    /// An armed guard over what an upload made.
    pub(crate) fn new(made: U) -> Self {
        CleanupGuard { made, armed: true }
    }

    /// Nothing is to be undone on drop any more: the upload finished, or it was cleaned up in
    /// line.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<U: Undo> Deref for CleanupGuard<U> {
    type Target = U;

    fn deref(&self) -> &U {
        &self.made
    }
}

impl<U: Undo> DerefMut for CleanupGuard<U> {
    fn deref_mut(&mut self) -> &mut U {
        &mut self.made
    }
}

impl<U: Undo> Drop for CleanupGuard<U> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                self.made.cancelled();
                rt.spawn(self.made.undo());
            }
            Err(_) => self.made.stranded(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<&'static str>>>);

    impl Log {
        fn seen(&self) -> Vec<&'static str> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Undo for Log {
        fn cancelled(&self) {
            self.0.lock().unwrap().push("cancelled");
        }
        fn stranded(&self) {
            self.0.lock().unwrap().push("stranded");
        }
        fn undo(&self) -> BoxFuture<'static, ()> {
            let log = self.clone();
            Box::pin(async move { log.0.lock().unwrap().push("undone") })
        }
    }

    #[tokio::test]
    async fn armed_guard_undoes_on_drop_disarmed_does_not() {
        let log = Log::default();
        drop(CleanupGuard::new(log.clone()));
        tokio::task::yield_now().await;
        for _ in 0..100 {
            if log.seen().len() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(log.seen(), ["cancelled", "undone"]);
        let other = Log::default();
        let mut g = CleanupGuard::new(other.clone());
        g.disarm();
        drop(g);
        tokio::task::yield_now().await;
        assert!(other.seen().is_empty());
    }

    #[test]
    fn outside_a_runtime_it_only_says_so() {
        let log = Log::default();
        drop(CleanupGuard::new(log.clone()));
        assert_eq!(log.seen(), ["stranded"]);
    }
}
