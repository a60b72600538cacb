//! OpenStack Glance v2 as a stream target.
//!
//! Protocol flow of one upload (`upload` of [`Glance`] as a
//! [`StreamTarget`](super::StreamTarget)):
//!
//! 1. Authenticate. Keystone v3 (`POST {auth_url}/v3/auth/tokens`, password or application
//!    credential): the token comes back in the `X-Subject-Token` header and is sent as
//!    `X-Auth-Token`; with no configured `endpoint`, the image API's URL is taken from the
//!    token's service catalog (type `image`, the configured interface and region). For tests
//!    and Keystone-less deployments, fixed headers are sent instead (Glance's trusted-headers
//!    pipeline: `X-Identity-Status`, `X-Project-Id`, `X-User-Id`, `X-Roles`).
//! 2. `POST /v2/images` creates the record: name, `disk_format`, `container_format: bare`,
//!    visibility, and the caller's properties as top-level fields (strings; `min_disk` and
//!    `min_ram` as integers, `os_hidden` as a boolean). The image is `queued`.
//! 3. `PUT /v2/images/{id}/file` (or, with `use_import`, `PUT …/stage` then
//!    `POST …/import {"method": {"name": "glance-direct"}}`) sends the producer's stream with
//!    chunked transfer encoding, while sha256, sha512 and the length are computed. The body
//!    fails (so Glance never activates a short image) if the producer errs or its length
//!    differs from `meta.size`.
//! 4. `GET /v2/images/{id}` must show `status: active`, our `size`, and `os_hash_algo: sha512`
//!    with our sha512 as `os_hash_value` (sha256 is accepted too, for deployments that set
//!    `hashing_algorithm = sha256`).
//!
//! On any failure after step 2 the image is deleted (`DELETE /v2/images/{id}`), so nothing is
//! left `queued`, `saving` or `killed`. If Glance cannot be reached for the delete (it died
//! mid-upload), a background task keeps trying for `cleanup_patience_secs` and the error says
//! so; what is guaranteed is thus: deleted at once when Glance answers, deleted later if Glance
//! comes back within the patience while this process runs, else the error names the image id
//! to delete by hand.
//!
//! Dropping the upload future (a cancelled operation) deletes the image the same way, from a
//! task spawned on the runtime.
//!
//! Glance cannot resume an upload, so a transient failure (connection refused or cut, stall,
//! 5xx) restarts the whole upload: a new image and a fresh stream from the factory, up to
//! `attempts` times in total. 4xx answers, verification mismatches and producer errors are not
//! retried.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::defaults;
use super::http::{
    self, CleanupGuard, Executor, Failure, Meter, MeteredBody, Progress, RetryPolicy, Undo,
};
use super::{human, Protocol, Remote, Secret, StreamFactory, UploadMeta, Uploaded};
use crate::error::{invalid, Error, ErrorKind};

/// How imaged proves who it is to Glance.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GlanceAuth {
    /// Keystone v3 password authentication, scoped to a project.
    Keystone {
        /// Keystone URL, with or without the trailing `/v3`.
        auth_url: String,
        username: String,
        password: Secret,
        project: String,
        #[serde(default = "defaults::keystone_domain")]
        user_domain: String,
        #[serde(default = "defaults::keystone_domain")]
        project_domain: String,
    },
    /// Keystone v3 application credential (already scoped to its project).
    ApplicationCredential {
        auth_url: String,
        id: String,
        secret: Secret,
    },
    /// Fixed headers on every request (Glance's trusted-headers pipeline; tests).
    Headers(BTreeMap<String, String>),
}

impl fmt::Debug for GlanceAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlanceAuth::Keystone {
                auth_url,
                username,
                project,
                user_domain,
                project_domain,
                ..
            } => f
                .debug_struct("Keystone")
                .field("auth_url", auth_url)
                .field("username", username)
                .field("password", &"***")
                .field("project", project)
                .field("user_domain", user_domain)
                .field("project_domain", project_domain)
                .finish(),
            GlanceAuth::ApplicationCredential { auth_url, id, .. } => f
                .debug_struct("ApplicationCredential")
                .field("auth_url", auth_url)
                .field("id", id)
                .field("secret", &"***")
                .finish(),
            // Header values may carry a token: names only.
            GlanceAuth::Headers(h) => f
                .debug_tuple("Headers")
                .field(&h.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// Settings of a Glance target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlanceConfig {
    /// Image API base URL (`http://glance:9292`, no `/v2`). Optional with Keystone auth: the
    /// catalog's `image` endpoint is used then.
    #[serde(default)]
    pub endpoint: Option<String>,
    pub auth: GlanceAuth,
    /// Catalog endpoint interface: public, internal or admin.
    #[serde(default = "defaults::glance_interface")]
    pub interface: String,
    /// Catalog region (any when unset).
    #[serde(default)]
    pub region: Option<String>,
    /// Visibility of created images.
    #[serde(default = "defaults::glance_visibility")]
    pub visibility: String,
    /// Whole-upload attempts in total (transient failures only).
    #[serde(default = "defaults::glance_attempts")]
    pub attempts: u32,
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// A transfer with no progress for this long fails.
    #[serde(default = "defaults::stall_timeout_secs")]
    pub stall_timeout_secs: u64,
    /// Use the interoperable import flow (stage + glance-direct) instead of `PUT …/file`.
    #[serde(default)]
    pub use_import: bool,
    /// How long an import may take after the staging upload.
    #[serde(default = "defaults::glance_import_timeout_secs")]
    pub import_timeout_secs: u64,
    /// How long a failed upload's image deletion is retried in the background when Glance is
    /// unreachable.
    #[serde(default = "defaults::glance_cleanup_patience_secs")]
    pub cleanup_patience_secs: u64,
}

impl GlanceConfig {
    /// A config with every optional setting at its default.
    pub fn new(endpoint: Option<String>, auth: GlanceAuth) -> Self {
        GlanceConfig {
            endpoint,
            auth,
            interface: defaults::glance_interface(),
            region: None,
            visibility: defaults::glance_visibility(),
            attempts: defaults::glance_attempts(),
            connect_timeout_secs: defaults::connect_timeout_secs(),
            stall_timeout_secs: defaults::stall_timeout_secs(),
            use_import: false,
            import_timeout_secs: defaults::glance_import_timeout_secs(),
            cleanup_patience_secs: defaults::glance_cleanup_patience_secs(),
        }
    }
}

/// A Keystone token is reused for this long before a fresh one is fetched (tokens live an
/// hour by default; this avoids parsing `expires_at` and never runs close to expiry).
const TOKEN_REUSE: Duration = Duration::from_secs(600);
/// Image properties the caller may not set (Glance core fields or set by imaged).
const RESERVED: &[&str] = &[
    "id",
    "name",
    "status",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "disk_format",
    "container_format",
    "visibility",
    "owner",
    "locations",
    "direct_url",
    "file",
    "schema",
    "self",
    "created_at",
    "updated_at",
    "tags",
    "stores",
    // A protected image could not be deleted when the upload fails: protect it afterwards.
    "protected",
];

/// The Glance v2 target.
pub struct Glance {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: GlanceConfig,
    http: Executor,
    fixed_headers: HeaderMap,
    session: tokio::sync::Mutex<Option<Session>>,
}

#[derive(Clone)]
struct Session {
    /// Image API base URL, no trailing `/`.
    endpoint: String,
    token: Option<Secret>,
    obtained: Instant,
}

/// What happened to the image of a failed attempt.
enum Cleanup {
    Deleted,
    Deferred(String),
    Failed(String),
}

impl Glance {
    /// Checks the settings and builds the HTTP client (nothing is contacted yet).
    pub fn new(cfg: GlanceConfig) -> Result<Self, Error> {
        if let Some(ep) = &cfg.endpoint {
            check_url("glance endpoint", ep)?;
        }
        if cfg.attempts == 0 {
            return Err(invalid("glance target: attempts must be at least 1"));
        }
        if cfg.stall_timeout_secs == 0 || cfg.connect_timeout_secs == 0 {
            return Err(invalid("glance target: timeouts must be at least 1 s"));
        }
        if !matches!(
            cfg.visibility.as_str(),
            "private" | "shared" | "community" | "public"
        ) {
            return Err(invalid(format!(
                "glance target: visibility {:?}: use private, shared, community or public",
                cfg.visibility
            )));
        }
        let mut fixed_headers = HeaderMap::new();
        match &cfg.auth {
            GlanceAuth::Headers(h) => {
                if cfg.endpoint.is_none() {
                    return Err(invalid(
                        "glance target: an endpoint is required with header authentication",
                    ));
                }
                for (k, v) in h {
                    let name = HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| invalid(format!("glance target: bad header name {k:?}")))?;
                    let mut value = HeaderValue::from_str(v).map_err(|_| {
                        invalid(format!("glance target: bad value of header {k:?}"))
                    })?;
                    value.set_sensitive(true);
                    fixed_headers.insert(name, value);
                }
            }
            GlanceAuth::Keystone { auth_url, .. }
            | GlanceAuth::ApplicationCredential { auth_url, .. } => {
                check_url("keystone auth_url", auth_url)?;
            }
        }
        let http = Executor::new(
            Duration::from_secs(cfg.connect_timeout_secs),
            Duration::from_secs(cfg.stall_timeout_secs),
        )?;
        Ok(Glance {
            inner: Arc::new(Inner {
                cfg,
                http,
                fixed_headers,
                session: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GlanceConfig {
        &self.inner.cfg
    }
}

impl Remote for Glance {
    type Protocol = Inner;

    fn protocol(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl fmt::Debug for Glance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Glance")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn check_url(what: &str, url: &str) -> Result<(), Error> {
    http::check_url("glance", what, url).map(drop)
}

/// `http://host:9292/v2/` → `http://host:9292`.
fn normalize_endpoint(url: &str) -> String {
    let mut s = url.trim_end_matches('/');
    if let Some(stripped) = s.strip_suffix("/v2") {
        s = stripped;
    }
    s.trim_end_matches('/').to_string()
}

/// `http://ks:5000` or `http://ks:5000/v3/` → `http://ks:5000/v3`.
fn keystone_v3(auth_url: &str) -> String {
    let s = auth_url.trim_end_matches('/');
    if s.ends_with("/v3") {
        s.to_string()
    } else {
        format!("{s}/v3")
    }
}

impl Inner {
    /// A usable session (endpoint + token), from the cache or fresh from Keystone.
    async fn session(&self) -> Result<Session, Error> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            if s.token.is_none() || s.obtained.elapsed() < TOKEN_REUSE {
                return Ok(s.clone());
            }
        }
        let s = match &self.cfg.auth {
            GlanceAuth::Headers(_) => Session {
                endpoint: normalize_endpoint(self.cfg.endpoint.as_deref().unwrap_or_default()),
                token: None,
                obtained: Instant::now(),
            },
            _ => self.keystone_session().await?,
        };
        *guard = Some(s.clone());
        Ok(s)
    }

    async fn keystone_session(&self) -> Result<Session, Error> {
        let (auth_url, body, who) = match &self.cfg.auth {
            GlanceAuth::Keystone {
                auth_url,
                username,
                password,
                project,
                user_domain,
                project_domain,
            } => (
                auth_url,
                json!({"auth": {
                    "identity": {"methods": ["password"], "password": {"user": {
                        "name": username,
                        "domain": {"name": user_domain},
                        "password": password.expose(),
                    }}},
                    "scope": {"project": {"name": project, "domain": {"name": project_domain}}},
                }}),
                format!(
                    "user {username} (domain {user_domain}) for project {project} \
                     (domain {project_domain})"
                ),
            ),
            GlanceAuth::ApplicationCredential {
                auth_url,
                id,
                secret,
            } => (
                auth_url,
                json!({"auth": {"identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret.expose()},
                }}}),
                format!("application credential {id}"),
            ),
            GlanceAuth::Headers(_) => unreachable!("no keystone with header auth"),
        };
        let url = format!("{}/auth/tokens", keystone_v3(auth_url));
        let what = format!("keystone {auth_url}");
        let resp = self
            .http
            .send(&what, self.http.client().post(&url).json(&body))
            .await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("{what} rejected the credentials of {who} (wrong secret, unknown user or project, or no role on it)"),
            ));
        }
        if !status.is_success() {
            let text = self.http.read(resp).await.text;
            let kind = match status {
                StatusCode::NOT_FOUND => ErrorKind::FailedPrecondition,
                s => http::status_kind(s),
            };
            return Err(Error::new(
                kind,
                format!(
                    "{what}: token request for {who} answered {status}: {}",
                    http::excerpt(&text)
                ),
            ));
        }
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(|s| Secret::new(s.to_string()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    format!("{what}: token answer has no X-Subject-Token header"),
                )
            })?;
        let text = self.http.read(resp).await.text;
        let endpoint = match &self.cfg.endpoint {
            Some(ep) => normalize_endpoint(ep),
            None => {
                let doc: Value = serde_json::from_str(&text).map_err(|e| {
                    Error::new(
                        ErrorKind::Internal,
                        format!("{what}: token answer is not JSON"),
                    )
                    .with_source(e)
                })?;
                normalize_endpoint(&self.catalog_endpoint(&doc, &what)?)
            }
        };
        Ok(Session {
            endpoint,
            token: Some(token),
            obtained: Instant::now(),
        })
    }

    fn catalog_endpoint(&self, doc: &Value, what: &str) -> Result<String, Error> {
        let catalog = doc["token"]["catalog"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for svc in catalog.iter().filter(|s| s["type"] == "image") {
            for ep in svc["endpoints"].as_array().into_iter().flatten() {
                if ep["interface"] != self.cfg.interface.as_str() {
                    continue;
                }
                if let Some(region) = &self.cfg.region {
                    let r = ep["region_id"].as_str().or_else(|| ep["region"].as_str());
                    if r != Some(region.as_str()) {
                        continue;
                    }
                }
                if let Some(url) = ep["url"].as_str() {
                    return Ok(url.to_string());
                }
            }
        }
        Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "{what}: the service catalog has no image endpoint with interface {}{}: \
                 set the glance endpoint explicitly",
                self.cfg.interface,
                self.cfg
                    .region
                    .as_ref()
                    .map(|r| format!(" in region {r}"))
                    .unwrap_or_default()
            ),
        ))
    }

    fn request(&self, s: &Session, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self
            .http
            .client()
            .request(method, format!("{}{path}", s.endpoint))
            .headers(self.fixed_headers.clone());
        if let Some(t) = &s.token {
            if let Ok(mut v) = HeaderValue::from_str(t.expose()) {
                v.set_sensitive(true);
                rb = rb.header("x-auth-token", v);
            }
        }
        rb
    }

    /// A small request with a JSON or empty body: (status, body text), bounded in time.
    async fn call(
        &self,
        s: &Session,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<(StatusCode, String), Error> {
        let mut rb = self.request(s, method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let answer = self.http.call(what, rb).await?;
        Ok((answer.status, answer.text))
    }

    /// The error for an unexpected answer.
    fn answer_error(&self, what: &str, status: StatusCode, text: &str) -> Error {
        let kind = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::FailedPrecondition,
            s => http::status_kind(s),
        };
        let hint = match status {
            StatusCode::UNAUTHORIZED => " (credentials rejected)",
            StatusCode::FORBIDDEN => " (not allowed for this project/role)",
            _ => "",
        };
        Error::new(
            kind,
            format!(
                "{what}: glance answered {status}{hint}: {}",
                http::excerpt(text)
            ),
        )
    }

    fn create_body(&self, meta: &UploadMeta) -> Result<Value, Error> {
        let mut body = serde_json::Map::new();
        for (k, v) in &meta.properties {
            if RESERVED.contains(&k.as_str()) || k.starts_with("os_glance") {
                return Err(invalid(format!(
                    "image {}: property {k:?} is reserved and cannot be set at upload",
                    meta.name
                )));
            }
            if k.is_empty() || k.len() > 255 {
                return Err(invalid(format!(
                    "image {}: property name {k:?} must have 1 to 255 characters",
                    meta.name
                )));
            }
            let value = match k.as_str() {
                "min_disk" | "min_ram" => Value::from(v.trim().parse::<u64>().map_err(|_| {
                    invalid(format!(
                        "image {}: property {k} must be a whole number, not {v:?}",
                        meta.name
                    ))
                })?),
                "os_hidden" => Value::from(match v.as_str() {
                    "true" | "True" => true,
                    "false" | "False" => false,
                    _ => {
                        return Err(invalid(format!(
                            "image {}: property os_hidden must be true or false, not {v:?}",
                            meta.name
                        )))
                    }
                }),
                _ => Value::from(v.clone()),
            };
            body.insert(k.clone(), value);
        }
        body.insert("name".into(), Value::from(meta.name.clone()));
        body.insert("disk_format".into(), Value::from(meta.format.clone()));
        body.insert("container_format".into(), Value::from("bare"));
        body.insert(
            "visibility".into(),
            Value::from(self.cfg.visibility.clone()),
        );
        Ok(Value::Object(body))
    }

    async fn create_image(&self, s: &Session, body: &Value, name: &str) -> Result<String, Error> {
        let what = format!("glance {}: creating image {name}", s.endpoint);
        let (status, text) = self
            .call(s, Method::POST, "/v2/images", Some(body), &what)
            .await?;
        if status != StatusCode::CREATED && !status.is_success() {
            return Err(self.answer_error(&what, status, &text));
        }
        let doc: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        doc["id"].as_str().map(str::to_string).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("{what}: the answer has no image id"),
            )
        })
    }

    async fn get_image(&self, s: &Session, id: &str) -> Result<Value, Error> {
        let what = format!("glance {}: reading image {id}", s.endpoint);
        let (status, text) = self
            .call(s, Method::GET, &format!("/v2/images/{id}"), None, &what)
            .await?;
        if !status.is_success() {
            return Err(self.answer_error(&what, status, &text));
        }
        serde_json::from_str(&text).map_err(|e| {
            Error::new(ErrorKind::Internal, format!("{what}: answer is not JSON")).with_source(e)
        })
    }

    /// One try at deleting an image; `Ok` also when it is already gone.
    async fn delete_image(&self, id: &str) -> Result<(), Error> {
        let s = self.session().await?;
        let what = format!("glance {}: deleting image {id}", s.endpoint);
        let (status, text) = self
            .call(&s, Method::DELETE, &format!("/v2/images/{id}"), None, &what)
            .await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(self.answer_error(&what, status, &text))
    }

    /// Deletes the image of a failed attempt: a few quick tries, then (Glance unreachable) a
    /// background task for the configured patience.
    async fn cleanup(self: &Arc<Self>, id: &str) -> Cleanup {
        let tries = RetryPolicy::new(3, Duration::from_millis(500))
            .run(
                |_| async { self.delete_image(id).await.map_err(Failure::of) },
                |_| {},
            )
            .await;
        let reason = match tries {
            Ok(()) => {
                tracing::info!(image_id = %id, "deleted the glance image of a failed upload");
                return Cleanup::Deleted;
            }
            Err(g) if !g.retryable => return Cleanup::Failed(g.error.chain()),
            Err(g) => g.error.chain(),
        };
        let patience = Duration::from_secs(self.cfg.cleanup_patience_secs);
        if patience.is_zero() {
            return Cleanup::Failed(reason);
        }
        let inner = Arc::clone(self);
        let id_owned = id.to_string();
        tokio::spawn(async move {
            let deadline = Instant::now() + patience;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                match inner.delete_image(&id_owned).await {
                    Ok(()) => {
                        tracing::info!(image_id = %id_owned,
                            "deleted the glance image of a failed upload (delayed cleanup)");
                        return;
                    }
                    Err(e) if e.kind() == ErrorKind::Unavailable && Instant::now() < deadline => {}
                    Err(e) => {
                        tracing::error!(image_id = %id_owned, error = %e.chain(),
                            "gave up deleting the glance image of a failed upload: delete it by hand");
                        return;
                    }
                }
            }
        });
        Cleanup::Deferred(reason)
    }

    /// Streams the body into an image and verifies it: steps 3 and 4.
    async fn send_and_verify(
        &self,
        s: &Session,
        id: &str,
        meta: &UploadMeta,
        factory: StreamFactory<'_>,
    ) -> Result<(String, String, u64), Failure> {
        let path = if self.cfg.use_import { "stage" } else { "file" };
        let what = format!("glance {}: PUT /v2/images/{id}/{path}", s.endpoint);
        let meter = Meter::new(meta.size);
        let progress = Progress::new();
        // sha256 and sha512 (what Glance's os_hash_value is checked against) on another core.
        let (stream, hashes) = http::hashed(factory(), true);
        let body = MeteredBody::new(stream, meter.clone(), progress.clone());
        let req = self
            .request(s, Method::PUT, &format!("/v2/images/{id}/{path}"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body));
        let res = self
            .http
            .send_streamed(&what, req, &progress, Some(&meter))
            .await;
        let (sent, producer_error, complete) = {
            let mut m = http::lock(&meter);
            (m.sent(), m.producer_error.take(), m.complete)
        };
        if let Some(e) = producer_error {
            return Err(Failure::fatal(e));
        }
        let resp = res?;
        let status = resp.status();
        if !status.is_success() {
            let text = self.http.read(resp).await.text;
            let e = self.answer_error(&what, status, &text);
            return Err(Failure::answer(e, status));
        }
        if !complete {
            return Err(Failure::fatal(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what}: glance answered {status} after only {} of {}",
                    human(sent),
                    human(meta.size)
                ),
            )));
        }
        let (sha256, sha512, len) = hashes.finish().await.map_err(|e| {
            Failure::fatal(
                Error::new(ErrorKind::Internal, format!("{what}: hashing the upload"))
                    .with_source(e),
            )
        })?;
        let sha512 = sha512.unwrap_or_default();
        if self.cfg.use_import {
            self.import(s, id).await?;
        }
        self.verify(s, id, &sha256, &sha512, len).await?;
        Ok((sha256, sha512, len))
    }

    /// `POST /v2/images/{id}/import` with glance-direct.
    async fn import(&self, s: &Session, id: &str) -> Result<(), Failure> {
        let what = format!(
            "glance {}: importing image {id} (glance-direct)",
            s.endpoint
        );
        let body = json!({"method": {"name": "glance-direct"}});
        let (status, text) = self
            .call(
                s,
                Method::POST,
                &format!("/v2/images/{id}/import"),
                Some(&body),
                &what,
            )
            .await
            .map_err(Failure::of)?;
        if !status.is_success() {
            return Err(Failure::answer(
                self.answer_error(&what, status, &text),
                status,
            ));
        }
        Ok(())
    }

    /// Waits for `active` and compares size and hash.
    async fn verify(
        &self,
        s: &Session,
        id: &str,
        sha256: &str,
        sha512: &str,
        len: u64,
    ) -> Result<(), Failure> {
        let what = format!("glance {}: image {id}", s.endpoint);
        let wait = if self.cfg.use_import {
            Duration::from_secs(self.cfg.import_timeout_secs)
        } else {
            self.http.stall()
        };
        let deadline = Instant::now() + wait;
        let img = loop {
            let img = self.get_image(s, id).await.map_err(Failure::of)?;
            let status = img["status"].as_str().unwrap_or("").to_string();
            let failed_import = img["os_glance_failed_import"]
                .as_str()
                .is_some_and(|v| !v.is_empty());
            match status.as_str() {
                "active" => break img,
                "saving" | "importing" | "uploading" if Instant::now() < deadline => {}
                "queued" if self.cfg.use_import && !failed_import && Instant::now() < deadline => {}
                _ => {
                    let why = if failed_import {
                        " (glance-direct import failed)".to_string()
                    } else {
                        String::new()
                    };
                    return Err(Failure::fatal(Error::new(
                        ErrorKind::Internal,
                        format!("{what} is {status:?}{why} after the upload, not active"),
                    )));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let size = img["size"].as_u64();
        if size != Some(len) {
            return Err(Failure::fatal(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what}: glance stored {} bytes, imaged sent {len}",
                    size.map_or("an unknown number of".to_string(), |s| s.to_string())
                ),
            )));
        }
        let algo = img["os_hash_algo"].as_str().unwrap_or("");
        let value = img["os_hash_value"].as_str().unwrap_or("");
        let ours = match algo {
            "sha512" => sha512,
            "sha256" => sha256,
            _ => {
                return Err(Failure::fatal(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "{what}: glance hashes with {algo:?}; imaged verifies sha512 or sha256 \
                         only (Glance's hashing_algorithm setting)"
                    ),
                )))
            }
        };
        if !value.eq_ignore_ascii_case(ours) {
            return Err(Failure::fatal(Error::new(
                ErrorKind::Internal,
                format!("{what}: glance computed {algo} {value}, imaged sent {ours}: the bytes were altered in transit"),
            )));
        }
        Ok(())
    }

    /// One whole attempt: new image, stream, verify; the image is cleaned up on failure.
    async fn attempt(
        self: &Arc<Self>,
        meta: &UploadMeta,
        create: &Value,
        factory: StreamFactory<'_>,
        left_behind: &Mutex<Vec<String>>,
    ) -> Result<Uploaded, Failure> {
        let s = self.session().await.map_err(Failure::of)?;
        let id = self
            .create_image(&s, create, &meta.name)
            .await
            .map_err(Failure::of)?;
        tracing::info!(image = %meta.name, image_id = %id, target = %self.describe(),
            "glance image created, streaming");
        // Deletes the image if this future is dropped (the operation was cancelled) before
        // the image is verified or cleaned up below.
        let mut guard = CleanupGuard::new(PendingImage {
            inner: Arc::clone(self),
            id: id.clone(),
        });
        let outcome = self.send_and_verify(&s, &id, meta, factory).await;
        if outcome.is_ok() {
            guard.disarm();
        }
        match outcome {
            Ok((sha256, sha512, size)) => Ok(Uploaded {
                location: id,
                size,
                sha256,
                sha512: Some(sha512),
            }),
            Err(f) => {
                let cleanup = self.cleanup(&id).await;
                guard.disarm();
                let mut left_behind = left_behind.lock().unwrap_or_else(|e| e.into_inner());
                let note = match cleanup {
                    Cleanup::Deleted => format!("glance image {id} was deleted"),
                    Cleanup::Deferred(why) => {
                        left_behind.push(id.clone());
                        format!(
                            "glance image {id} could not be deleted yet ({why}); imaged retries \
                             for {} s in the background",
                            self.cfg.cleanup_patience_secs
                        )
                    }
                    Cleanup::Failed(why) => {
                        left_behind.push(id.clone());
                        format!("glance image {id} could not be deleted ({why}): delete it by hand")
                    }
                };
                let kind = f.error.kind();
                Err(Failure {
                    error: Error::new(kind, note).with_source(f.error),
                    retryable: f.retryable,
                })
            }
        }
    }
}

/// An image created by an attempt that has not ended yet: if the upload future is dropped
/// (a cancelled operation), its [`CleanupGuard`] deletes it as after a failure.
struct PendingImage {
    inner: Arc<Inner>,
    id: String,
}

impl Undo for PendingImage {
    fn cancelled(&self) {
        tracing::warn!(image_id = %self.id, "glance upload cancelled: deleting its image");
    }

    fn stranded(&self) {
        tracing::error!(image_id = %self.id,
            "glance upload dropped outside a runtime: its image is left behind");
    }

    fn undo(&self) -> BoxFuture<'static, ()> {
        let (inner, id) = (Arc::clone(&self.inner), self.id.clone());
        Box::pin(async move {
            if let Cleanup::Failed(why) = inner.cleanup(&id).await {
                tracing::error!(image_id = %id, error = %why,
                    "could not delete the glance image of a cancelled upload: delete it by hand");
            }
        })
    }
}

#[tonic::async_trait]
impl Protocol for Inner {
    fn describe(&self) -> String {
        if let Some(ep) = &self.cfg.endpoint {
            return format!("glance {}", normalize_endpoint(ep));
        }
        if let Ok(guard) = self.session.try_lock() {
            if let Some(s) = guard.as_ref() {
                return format!("glance {}", s.endpoint);
            }
        }
        match &self.cfg.auth {
            GlanceAuth::Keystone { auth_url, .. }
            | GlanceAuth::ApplicationCredential { auth_url, .. } => {
                format!("glance (from the catalog of keystone {auth_url})")
            }
            GlanceAuth::Headers(_) => "glance".into(),
        }
    }

    async fn check(&self) -> Result<(), Error> {
        let s = self.session().await?;
        let what = format!("glance {}: listing images", s.endpoint);
        let (status, text) = self
            .call(&s, Method::GET, "/v2/images?limit=1", None, &what)
            .await?;
        if status.is_success() {
            let doc: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if doc["images"].is_array() {
                return Ok(());
            }
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("{what}: the answer is not a Glance v2 image list (wrong endpoint?)"),
            ));
        }
        let mut e = self.answer_error(&what, status, &text);
        if status == StatusCode::NOT_FOUND {
            e = Error::new(
                ErrorKind::FailedPrecondition,
                format!("{what}: no Glance v2 API there (404)"),
            );
        }
        Err(e)
    }

    async fn upload(
        this: &Arc<Self>,
        meta: &UploadMeta,
        body: StreamFactory<'_>,
    ) -> Result<Uploaded, Error> {
        let create = this.create_body(meta)?;
        let started = Instant::now();
        let left_behind = Mutex::new(Vec::new());
        let outcome = RetryPolicy::new(this.cfg.attempts, Duration::from_secs(1))
            .run(
                |_| this.attempt(meta, &create, body, &left_behind),
                |r| {
                    tracing::warn!(image = %meta.name, target = %this.describe(),
                        attempt = r.attempt, attempts = r.attempts, error = %r.error.chain(),
                        retry_in_ms = r.wait.as_millis() as u64,
                        "glance upload failed, restarting it from the first byte");
                },
            )
            .await;
        let g = match outcome {
            Ok(up) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(image = %meta.name, image_id = %up.location,
                    target = %this.describe(), bytes = up.size, secs,
                    mib_per_s = up.size as f64 / (1 << 20) as f64 / secs.max(1e-6),
                    "glance upload verified");
                return Ok(up);
            }
            Err(g) => g,
        };
        let earlier = left_behind
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_iter()
            .filter(|id| !g.error.to_string().contains(id.as_str()))
            .collect::<Vec<_>>();
        let earlier = if earlier.is_empty() {
            String::new()
        } else {
            format!(
                "; images of earlier attempts not deleted yet: {}",
                earlier.join(", ")
            )
        };
        let (attempt, attempts) = (g.attempt, g.attempts);
        Err(Error::new(
            g.error.kind(),
            format!(
                "upload of image {} ({}, {}) to {} failed (attempt {attempt} of \
                 {attempts}){earlier}",
                meta.name,
                meta.format,
                human(meta.size),
                this.describe()
            ),
        )
        .with_source(g.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::StreamTarget;

    fn headers_cfg() -> GlanceConfig {
        let mut h = BTreeMap::new();
        h.insert("X-Identity-Status".to_string(), "Confirmed".to_string());
        GlanceConfig::new(
            Some("http://127.0.0.1:9/v2/".into()),
            GlanceAuth::Headers(h),
        )
    }

    #[test]
    fn endpoints_normalized() {
        assert_eq!(normalize_endpoint("http://g:9292/v2/"), "http://g:9292");
        assert_eq!(normalize_endpoint("http://g/image/"), "http://g/image");
        assert_eq!(keystone_v3("http://k:5000"), "http://k:5000/v3");
        assert_eq!(keystone_v3("http://k:5000/v3/"), "http://k:5000/v3");
        let g = Glance::new(headers_cfg()).unwrap();
        assert_eq!(g.describe(), "glance http://127.0.0.1:9");
    }

    #[test]
    fn config_parses_and_hides_secrets() {
        let cfg: GlanceConfig = toml::from_str(
            r#"
            auth = { keystone = { auth_url = "http://ks:5000", username = "u", password = "pw-1", project = "p" } }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.attempts, 2);
        assert_eq!(cfg.stall_timeout_secs, 60);
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("pw-1"), "{dbg}");
        assert!(dbg.contains("Default"));
        let cfg: GlanceConfig = toml::from_str(
            r#"
            endpoint = "http://g:9292"
            auth = { headers = { X-Auth-Token = "tok-1" } }
            "#,
        )
        .unwrap();
        assert!(!format!("{cfg:?}").contains("tok-1"));
        assert!(toml::from_str::<GlanceConfig>("auth = { nope = {} }").is_err());
    }

    #[test]
    fn create_body_types_and_reserved() {
        let g = Glance::new(headers_cfg()).unwrap();
        let mut meta = UploadMeta {
            name: "web-1".into(),
            format: "qcow2".into(),
            size: 1,
            properties: BTreeMap::new(),
        };
        meta.properties.insert("min_disk".into(), "20".into());
        meta.properties.insert("os_distro".into(), "debian".into());
        let b = g.inner.create_body(&meta).unwrap();
        assert_eq!(b["min_disk"], 20);
        assert_eq!(b["os_distro"], "debian");
        assert_eq!(b["container_format"], "bare");
        assert_eq!(b["visibility"], "private");
        meta.properties.insert("min_disk".into(), "big".into());
        assert!(g.inner.create_body(&meta).is_err());
        meta.properties.remove("min_disk");
        meta.properties.insert("size".into(), "1".into());
        let e = g.inner.create_body(&meta).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn header_auth_needs_endpoint() {
        let mut cfg = headers_cfg();
        cfg.endpoint = None;
        assert!(Glance::new(cfg).is_err());
        let mut cfg = headers_cfg();
        cfg.endpoint = Some("http://user:pw@g:9292".into());
        let e = Glance::new(cfg).unwrap_err();
        assert!(!e.chain().contains("pw@"), "{}", e.chain());
    }

    #[test]
    fn catalog_lookup() {
        let mut cfg = GlanceConfig::new(
            None,
            GlanceAuth::ApplicationCredential {
                auth_url: "http://ks:5000".into(),
                id: "ac".into(),
                secret: "s".into(),
            },
        );
        cfg.region = Some("r2".into());
        let g = Glance::new(cfg).unwrap();
        let doc = json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region_id": "r2", "url": "http://ks"}]},
            {"type": "image", "endpoints": [
                {"interface": "public", "region_id": "r1", "url": "http://g1:9292"},
                {"interface": "internal", "region_id": "r2", "url": "http://g2-int:9292"},
                {"interface": "public", "region_id": "r2", "url": "http://g2:9292/"},
            ]},
        ]}});
        assert_eq!(
            g.inner.catalog_endpoint(&doc, "ks").unwrap(),
            "http://g2:9292/"
        );
        let e = g.inner.catalog_endpoint(&json!({}), "ks").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    }
}
