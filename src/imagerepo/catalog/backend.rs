//! The catalog's database seam: one small query layer with two backends, SQLite (embedded,
//! the default) and PostgreSQL (several repository servers sharing one catalog).
//!
//! The rules in `catalog/mod.rs` are written once against [`Tx`]: `execute`, `query_row`,
//! `query_map`, `exists` (also through [`Stmt`], a prepared-statement look-alike), with
//! parameters as [`Value`]s (integers, text, null) and rows as [`Row`]s of values. Every
//! difference between the two databases lives here:
//! - placeholders: the rules write `?1`, `?2` (SQLite's form); PostgreSQL gets `$1`, `$2`
//!   ([`pg_sql`]), translated once per statement and cached with the prepared statement;
//! - types: the schema uses `BIGINT` and `TEXT` only; a PostgreSQL parameter is bound as the
//!   type the server inferred for it (`INT8`, `INT4`, `TEXT`), a column read back as an
//!   integer or text whatever its width (`COUNT(*)` is `INT8`, `SELECT 1` is `INT4`);
//! - transactions: SQLite takes its write lock at `BEGIN IMMEDIATE`, so one writer runs at a
//!   time and a check-then-write (quota, `name:tag`, the member limit, commit) cannot race;
//!   PostgreSQL runs every catalog transaction at `SERIALIZABLE`, so the same check-then-write
//!   sequences are safe across servers: a transaction whose reads another one changed fails
//!   with a serialization failure (SQLSTATE 40001, or 40P01 for a deadlock), which
//!   [`DbError::retryable`] recognises and the catalog answers by running the whole
//!   transaction again (see `Catalog::tx`). Serializable isolation was chosen over
//!   `SELECT … FOR UPDATE` because the racy checks read absent rows (a count of images, a
//!   name not yet taken), which row locks cannot lock.
//!
//! Each [`Catalog`](super::Catalog) holds one connection behind a mutex, as before: one
//! repository server runs one catalog transaction at a time, several servers run theirs
//! concurrently on PostgreSQL.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use postgres::error::SqlState;
use postgres::types::{ToSql, Type};

/// A parameter or column value: the schema only stores integers and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Integer(i64),
    Text(String),
}

/// A database failure (either backend), or no row where one was expected.
#[derive(Debug)]
pub enum DbError {
    /// `query_row` found no row (see [`OptionalExtension::optional`]).
    NoRows,
    Sqlite(rusqlite::Error),
    Postgres(postgres::Error),
    /// A column did not hold the type the rules read it as.
    Type(String),
}

impl DbError {
    /// True for a PostgreSQL serialization failure or deadlock: the transaction lost a race
    /// with another one and runs again.
    pub fn retryable(&self) -> bool {
        match self {
            DbError::Postgres(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
            ),
            _ => false,
        }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::NoRows => write!(f, "no row"),
            DbError::Sqlite(e) => write!(f, "sqlite: {e}"),
            DbError::Postgres(e) => match e.as_db_error() {
                Some(d) => write!(f, "postgresql: {} ({})", d.message(), d.code().code()),
                None => write!(f, "postgresql: {e}"),
            },
            DbError::Type(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for DbError {}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::QueryReturnedNoRows => DbError::NoRows,
            e => DbError::Sqlite(e),
        }
    }
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

/// Result of a database call.
pub type DbResult<T> = std::result::Result<T, DbError>;

/// `query_row(...).optional()`: no row as `None`.
pub trait OptionalExtension<T> {
    fn optional(self) -> DbResult<Option<T>>;
}

impl<T> OptionalExtension<T> for DbResult<T> {
    fn optional(self) -> DbResult<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A Rust value that binds as a parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

impl ToValue for i64 {
    fn to_value(&self) -> Value {
        Value::Integer(*self)
    }
}

impl ToValue for i32 {
    fn to_value(&self) -> Value {
        Value::Integer((*self).into())
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

/// What a call takes as its parameters: `params![a, b]`, an array, or a slice of values.
pub trait Params {
    fn values(self) -> Vec<Value>;
}

impl Params for &[&dyn ToValue] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}

impl Params for &[Value] {
    fn values(self) -> Vec<Value> {
        self.to_vec()
    }
}

/// `params![a, b, c]`: parameters of mixed types.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$(&$p as &dyn $crate::imagerepo::catalog::backend::ToValue),*]
            as &[&dyn $crate::imagerepo::catalog::backend::ToValue]
    };
}
pub(crate) use params;

/// A Rust value a column reads as.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for i32 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Integer(i) => i32::try_from(*i).ok(),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row.
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> DbResult<T> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| DbError::Type(format!("no column {i}")))?;
        T::from_value(v).ok_or_else(|| {
            DbError::Type(format!(
                "column {i} holds {v:?}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// `?N` placeholders (SQLite's) as `$N` (PostgreSQL's); quoted text is left alone.
pub fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut next = 0;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '?' || quoted {
            out.push(c);
            continue;
        }
        let mut n = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        if n.is_empty() {
            next += 1;
            n = next.to_string();
        }
        out.push('$');
        out.push_str(&n);
    }
    out
}

/// A PostgreSQL connection and its prepared statements (by the SQL the rules wrote).
pub struct PgConn {
    /// Always `Some` until dropped.
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

impl PgConn {
    pub fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client: Some(client),
            statements: HashMap::new(),
        }
    }

    fn client(&mut self) -> DbResult<&mut postgres::Client> {
        self.client
            .as_mut()
            .ok_or_else(|| DbError::Type("the PostgreSQL connection is closed".into()))
    }
}

impl Drop for PgConn {
    /// `postgres::Client` closes its connection by blocking on its own runtime, which panics
    /// on a thread that drives async tasks (the server drops its catalog in `main`'s
    /// runtime): close it on a thread of its own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

/// A connection of either backend.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

impl Conn {
    /// Begins a transaction: `BEGIN IMMEDIATE` on SQLite, `SERIALIZABLE` on PostgreSQL.
    pub fn transaction(&mut self) -> DbResult<Tx<'_>> {
        Ok(match self {
            Conn::Sqlite(c) => {
                Tx::Sqlite(c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
            }
            Conn::Postgres(pg) => {
                let PgConn { client, statements } = &mut **pg;
                let client = client
                    .as_mut()
                    .ok_or_else(|| DbError::Type("the PostgreSQL connection is closed".into()))?;
                let tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::Serializable)
                    .start()?;
                Tx::Postgres(RefCell::new(PgTx { tx, statements }))
            }
        })
    }

    /// Runs statements without parameters (the schema's), outside the rules.
    pub fn batch(&mut self, sql: &str) -> DbResult<()> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            Conn::Postgres(p) => p.client()?.batch_execute(sql)?,
        }
        Ok(())
    }

    /// True once a PostgreSQL connection is gone (the server restarted): open a new one.
    pub fn is_closed(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(p) => p.client.as_ref().is_none_or(|c| c.is_closed()),
        }
    }
}

/// A PostgreSQL transaction with its connection's statement cache.
pub struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    statements: &'a mut HashMap<String, postgres::Statement>,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> DbResult<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(&pg_sql(sql))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// `params` bound as the types the server inferred.
    fn bind(st: &postgres::Statement, params: Vec<Value>) -> DbResult<Vec<Box<dyn ToSql + Sync>>> {
        if st.params().len() != params.len() {
            return Err(DbError::Type(format!(
                "the statement takes {} parameters, {} given",
                st.params().len(),
                params.len()
            )));
        }
        st.params()
            .iter()
            .zip(params)
            .map(|(ty, v)| -> DbResult<Box<dyn ToSql + Sync>> {
                Ok(match (v, ty) {
                    (Value::Integer(i), t) if *t == Type::INT4 => Box::new(
                        i32::try_from(i).map_err(|_| DbError::Type(format!("{i} exceeds INT4")))?,
                    ),
                    (Value::Integer(i), t) if *t == Type::INT2 => Box::new(
                        i16::try_from(i).map_err(|_| DbError::Type(format!("{i} exceeds INT2")))?,
                    ),
                    (Value::Integer(i), t) if *t == Type::TEXT || *t == Type::VARCHAR => {
                        Box::new(i.to_string())
                    }
                    (Value::Integer(i), _) => Box::new(i),
                    (Value::Text(s), _) => Box::new(s),
                    (Value::Null, t) if *t == Type::TEXT || *t == Type::VARCHAR => {
                        Box::new(None::<String>)
                    }
                    (Value::Null, _) => Box::new(None::<i64>),
                })
            })
            .collect()
    }

    fn query(&mut self, sql: &str, params: Vec<Value>) -> DbResult<Vec<Row>> {
        let st = self.statement(sql)?;
        let bound = Self::bind(&st, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
        let rows = self.tx.query(&st, &refs)?;
        rows.iter().map(pg_row).collect()
    }

    fn execute(&mut self, sql: &str, params: Vec<Value>) -> DbResult<usize> {
        let st = self.statement(sql)?;
        let bound = Self::bind(&st, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref()).collect();
        Ok(self.tx.execute(&st, &refs)? as usize)
    }
}

/// A PostgreSQL row as values.
fn pg_row(r: &postgres::Row) -> DbResult<Row> {
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let t = c.type_();
        let v = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Integer)
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?
                .map(|x| Value::Integer(x.into()))
        } else if *t == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?
                .map(|x| Value::Integer(x.into()))
        } else if *t == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?
                .map(|x| Value::Integer(x.into()))
        } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME || *t == Type::BPCHAR
        {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            return Err(DbError::Type(format!(
                "column {} is of type {t}, which the catalog does not read",
                c.name()
            )));
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// A SQLite row as values.
fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let n = r.as_ref().column_count();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match r.get::<_, rusqlite::types::Value>(i)? {
            rusqlite::types::Value::Integer(x) => Value::Integer(x),
            rusqlite::types::Value::Text(s) => Value::Text(s),
            rusqlite::types::Value::Null => Value::Null,
            rusqlite::types::Value::Real(x) => Value::Integer(x as i64),
            rusqlite::types::Value::Blob(b) => Value::Text(String::from_utf8_lossy(&b).into()),
        });
    }
    Ok(Row(out))
}

fn sqlite_params(p: &[Value]) -> Vec<rusqlite::types::Value> {
    p.iter()
        .map(|v| match v {
            Value::Null => rusqlite::types::Value::Null,
            Value::Integer(i) => rusqlite::types::Value::Integer(*i),
            Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        })
        .collect()
}

/// A transaction of either backend; the rules' only way to the database.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(RefCell<PgTx<'a>>),
}

impl<'a> Tx<'a> {
    /// Every row `sql` returns.
    pub fn rows(&self, sql: &str, params: impl Params) -> DbResult<Vec<Row>> {
        let params = params.values();
        match self {
            Tx::Sqlite(tx) => {
                let mut st = tx.prepare_cached(sql)?;
                let rows = st.query_map(
                    rusqlite::params_from_iter(sqlite_params(&params)),
                    sqlite_row,
                )?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            }
            Tx::Postgres(tx) => tx.borrow_mut().query(sql, params),
        }
    }

    /// Runs `sql`; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> DbResult<usize> {
        let params = params.values();
        match self {
            Tx::Sqlite(tx) => Ok(tx
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(sqlite_params(&params)))?),
            Tx::Postgres(tx) => tx.borrow_mut().execute(sql, params),
        }
    }

    /// The first row through `f`; [`DbError::NoRows`] when there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> DbResult<T>,
    ) -> DbResult<T> {
        let rows = self.rows(sql, params)?;
        f(rows.first().ok_or(DbError::NoRows)?)
    }

    /// Every row through `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnMut(&Row) -> DbResult<T>,
    ) -> DbResult<std::vec::IntoIter<DbResult<T>>> {
        let rows = self.rows(sql, params)?;
        Ok(rows.iter().map(f).collect::<Vec<_>>().into_iter())
    }

    /// A statement to run (perhaps many times) in this transaction.
    pub fn prepare_cached<'s>(&'s self, sql: &'s str) -> DbResult<Stmt<'s, 'a>> {
        Ok(Stmt { tx: self, sql })
    }

    /// Same as [`Tx::prepare_cached`].
    pub fn prepare<'s>(&'s self, sql: &'s str) -> DbResult<Stmt<'s, 'a>> {
        self.prepare_cached(sql)
    }

    /// Commits.
    pub fn commit(self) -> DbResult<()> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.commit()?),
            Tx::Postgres(tx) => Ok(tx.into_inner().tx.commit()?),
        }
    }
}

/// A statement of a transaction (prepared and cached by the backend).
pub struct Stmt<'s, 't> {
    tx: &'s Tx<'t>,
    sql: &'s str,
}

impl Stmt<'_, '_> {
    pub fn execute(&mut self, params: impl Params) -> DbResult<usize> {
        self.tx.execute(self.sql, params)
    }

    pub fn exists(&mut self, params: impl Params) -> DbResult<bool> {
        Ok(!self.tx.rows(self.sql, params)?.is_empty())
    }

    pub fn query_row<T>(
        &mut self,
        params: impl Params,
        f: impl FnOnce(&Row) -> DbResult<T>,
    ) -> DbResult<T> {
        self.tx.query_row(self.sql, params, f)
    }

    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        f: impl FnMut(&Row) -> DbResult<T>,
    ) -> DbResult<std::vec::IntoIter<DbResult<T>>> {
        self.tx.query_map(self.sql, params, f)
    }
}

#[cfg(test)]
mod tests {
    use super::pg_sql;

    #[test]
    fn placeholders_translate_outside_quotes() {
        assert_eq!(
            pg_sql("SELECT 1 FROM t WHERE a = ?1 AND b = '?2' AND c = ?12 AND d = ?"),
            "SELECT 1 FROM t WHERE a = $1 AND b = '?2' AND c = $12 AND d = $1"
        );
    }
}
