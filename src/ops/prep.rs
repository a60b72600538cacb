//! Guest prep steps as agent actions (plan / apply / restore), over [`crate::guest`].

use super::Agent;
use crate::error::{Error, ErrorKind, Result};
use crate::proto;

impl Agent {
    /// Dry run of prep steps on a running domain.
    pub async fn plan_prep(
        &self,
        domain: &str,
        steps: &[String],
    ) -> Result<Vec<proto::PrepStepReport>> {
        let _ = (domain, steps);
        Err(Error::new(
            ErrorKind::Internal,
            "TEMPORARY: prep steps land with the guest module",
        ))
    }
}
