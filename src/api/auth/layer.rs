//! The gate: a tower layer in front of every service. For each request it reads the peer
//! from the connection info, asks the policy in force for the caller's roles, looks the
//! method up in [`super::methods`], and either refuses it (PERMISSION_DENIED, logged at
//! warn) or passes it on with the [`Caller`] in its extensions.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

use super::methods::{method_name, need, Need};
use super::{Caller, Peer, Trust};

/// Applies the policy of a [`Trust`] to every request.
#[derive(Clone)]
pub struct AuthLayer {
    trust: Arc<Trust>,
}

impl AuthLayer {
    /// A layer judging requests by `trust`'s policy (the one in force at each request).
    pub fn new(trust: Arc<Trust>) -> AuthLayer {
        AuthLayer { trust }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            trust: self.trust.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    trust: Arc<Trust>,
}

/// Decides one request: the caller, or the refusal to answer with.
pub fn judge(trust: &Trust, path: &str, peer: &Peer) -> Result<Caller, tonic::Status> {
    let caller = trust.policy().caller(peer);
    match need(path) {
        Need::Anyone => Ok(caller),
        Need::Role(r) if caller.has(r) => Ok(caller),
        Need::Role(r) => {
            let method = method_name(path);
            let given = if caller.roles.is_empty() {
                "the policy gives it none".to_string()
            } else {
                format!("the policy gives it {}", caller.roles_text())
            };
            tracing::warn!(caller = %caller.name, identity = %peer.describe(), method = %method, needs = r.name(), "request denied");
            let facts = crate::error::Facts {
                reason: "ROLE_MISSING".into(),
                subject: caller.name.clone(),
                ..Default::default()
            };
            Err(crate::error::rich_status(
                crate::error::ErrorKind::PermissionDenied,
                &format!(
                    "{} may not call {method}: it needs the {} role; {given}",
                    peer.describe(),
                    r.name()
                ),
                &facts,
            ))
        }
    }
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = Peer::of(req.extensions());
        match judge(&self.trust, req.uri().path(), &peer) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                // The clone that was not made ready stays; the ready one serves this call.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn denials_name_the_identity_the_method_and_the_role() {
        let trust = Trust::new(
            &Config::parse("[[policy]]\nrole = \"viewer\"\nunix_uids = [1000]\n").unwrap(),
        )
        .unwrap();
        let viewer = Peer::Unix {
            uid: 1000,
            gid: 1000,
        };
        let c = judge(&trust, "/imaged.v1.ImageService/ListImages", &viewer).unwrap();
        assert_eq!(c.name, "uid:1000");
        let e = judge(&trust, "/imaged.v1.ImageService/CaptureImage", &viewer).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "uid 1000 (gid 1000) may not call imaged.v1.ImageService/CaptureImage: it needs \
             the operator role; the policy gives it viewer"
        );
        let nobody = Peer::Unix {
            uid: 65534,
            gid: 65534,
        };
        let e = judge(&trust, "/imaged.v1.DomainService/ListDomains", &nobody).unwrap_err();
        assert!(
            e.message().ends_with("the policy gives it none"),
            "{}",
            e.message()
        );
        // Health is open to any connected peer, even one without credentials.
        judge(&trust, "/grpc.health.v1.Health/Check", &Peer::Unknown).unwrap();
        let e = judge(&trust, "/imaged.v1.Nope/Nope", &viewer).unwrap_err();
        assert!(e.message().contains("admin role"), "{}", e.message());
    }
}
