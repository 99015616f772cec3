//! `tollgate accounts|keys|credits …`: account administration from the command line.
//!
//! Each command is an [`admin::Op`]. When no sidecar holds the store, it is applied to the
//! store directly; when one does (the store is locked), it goes to that sidecar's admin API at
//! `admin.listen` with the admin token, so both paths give the same answer. Results are
//! printed as JSON on stdout; errors go to stderr with their code, and exit status 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::{Failed, config_path};
use crate::admin::{self, Op, Reply};
use crate::config::Config;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Sidecar config file (YAML): where the store is and where the admin API listens
    /// [default: $TOLLGATE_CONFIG, else ./tollgate.yaml when it exists, else built-in defaults]
    #[arg(long, value_name = "FILE", global = true)]
    pub(super) config: Option<PathBuf>,
}

/// Prepaid accounts: each holds a balance in credits and any number of API keys.
#[derive(Debug, clap::Args)]
pub struct AccountsArgs {
    #[command(subcommand)]
    command: AccountsCommand,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// Open an account with a zero balance; prints its id.
    Create {
        /// A name to recognise the account by (customer, team).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List accounts with their balances.
    List {
        /// Show accounts with an id above this one (paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = admin::DEFAULT_PAGE)]
        limit: usize,
    },
    /// Show one account and its balance.
    Show {
        /// The account id.
        account: u64,
    },
}

/// API keys: issued once (only a hash is kept), listed by id, revoked.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Issue a key for an account. The key is printed once: store it now.
    Issue {
        #[arg(long)]
        account: u64,
        /// What the key is for.
        #[arg(long, default_value = "")]
        label: String,
        /// Make the key expire after this long: 90s, 30m, 12h, 30d.
        #[arg(long, value_name = "DURATION", value_parser = admin::parse_duration_secs)]
        expires_in: Option<u64>,
    },
    /// List an account's keys (ids and state, never the keys).
    List {
        #[arg(long)]
        account: u64,
    },
    /// Revoke a key by its id (`tg_` and 12 hex digits); it stops paying at once.
    Revoke {
        /// The key id, as `keys list` shows it.
        key_id: String,
    },
}

/// Credits: top-ups, balances, the ledger.
#[derive(Debug, clap::Args)]
pub struct CreditsArgs {
    #[command(subcommand)]
    command: CreditsCommand,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum CreditsCommand {
    /// Credit an account. The reference (invoice, payment id) makes a retry safe: a reference
    /// credits once.
    TopUp {
        #[arg(long)]
        account: u64,
        /// Whole credits.
        #[arg(long)]
        credits: u128,
        #[arg(long)]
        reference: String,
    },
    /// An account's balance.
    Balance {
        #[arg(long)]
        account: u64,
    },
    /// An account's ledger: top-ups, debits and refunds, oldest first.
    Usage {
        #[arg(long)]
        account: u64,
        /// Show entries with a sequence number above this one (paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = admin::DEFAULT_PAGE)]
        limit: usize,
    },
    /// Check that top-ups − debits + refunds equals the balance of every account.
    Audit,
}

pub fn accounts(args: AccountsArgs) -> Result<ExitCode, Failed> {
    let op = match args.command {
        AccountsCommand::Create { name } => Op::CreateAccount { name },
        AccountsCommand::List { after, limit } => Op::ListAccounts { after, limit },
        AccountsCommand::Show { account } => Op::ShowAccount { account },
    };
    execute(&args.common, op)
}

pub fn keys(args: KeysArgs) -> Result<ExitCode, Failed> {
    let op = match args.command {
        KeysCommand::Issue {
            account,
            label,
            expires_in,
        } => Op::IssueKey {
            account,
            label,
            expires_in_secs: expires_in,
        },
        KeysCommand::List { account } => Op::ListKeys { account },
        KeysCommand::Revoke { key_id } => Op::RevokeKey { key: key_id },
    };
    execute(&args.common, op)
}

pub fn credits(args: CreditsArgs) -> Result<ExitCode, Failed> {
    let op = match args.command {
        CreditsCommand::TopUp {
            account,
            credits,
            reference,
        } => Op::TopUp {
            account,
            credits,
            reference,
        },
        CreditsCommand::Balance { account } => Op::ShowAccount { account },
        CreditsCommand::Usage {
            account,
            after,
            limit,
        } => Op::Usage {
            account,
            after,
            limit,
        },
        CreditsCommand::Audit => Op::Audit,
    };
    execute(&args.common, op)
}

/// Applies the operation to the store, or through the running sidecar's admin API, and prints
/// the answer.
pub(super) fn execute(common: &Common, op: Op) -> Result<ExitCode, Failed> {
    print(&reply(common, op)?)
}

/// The sidecar config the command works with.
pub(super) fn config(common: &Common) -> Result<Config, Failed> {
    let resolved = Config::load(config_path(common.config.as_ref()).as_deref())
        .map_err(|e| format!("invalid configuration:\n{e}"))?;
    Ok(resolved.config)
}

/// A runtime for one command.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failed> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))
}

/// The answer to the operation, from the store or through the running sidecar's admin API.
pub(super) fn reply(common: &Common, op: Op) -> Result<Reply, Failed> {
    let config = config(common)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        match Store::open(&config.store) {
            Ok(store) => Ok(admin::apply(&store, op, crate::unix_now()).await),
            Err(e) if e.in_use() => through_api(&config, &op).await,
            Err(e) => Err(format!(
                "cannot open the store at {}: {e}",
                config.store.display()
            )),
        }
    })
}

/// A request to the running sidecar's admin API, with the admin token; the URL is made of
/// `admin.listen` and `target`.
pub(super) fn admin_request(
    config: &Config,
    method: &str,
    target: &str,
    timeout: Option<std::time::Duration>,
) -> Result<(reqwest::RequestBuilder, std::net::SocketAddr), Failed> {
    let token = admin::token::read(&admin::token::source(config)).map_err(|e| {
        format!("a sidecar holds the store, so this goes through its admin API, but {e}")
    })?;
    let mut address = config.admin.listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{address}{target}");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder();
    if let Some(timeout) = timeout {
        client = client.timeout(timeout);
    }
    let client = client
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let method =
        reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| format!("bad method: {e}"))?;
    Ok((client.request(method, &url).bearer_auth(token), address))
}

async fn through_api(config: &Config, op: &Op) -> Result<Reply, Failed> {
    let (method, target, body) = op.to_http();
    let (mut request, address) = admin_request(
        config,
        method,
        &target,
        Some(std::time::Duration::from_secs(300)),
    )?;
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| {
        format!(
            "a sidecar holds the store, but its admin API at http://{address} did not answer: {e}"
        )
    })?;
    let status = response.status().as_u16();
    let body = response
        .json()
        .await
        .map_err(|e| format!("the admin API answered {status} without JSON: {e}"))?;
    Ok(Reply { status, body })
}

pub(super) fn print(reply: &Reply) -> Result<ExitCode, Failed> {
    if reply.status < 400 || reply.body.get("error").is_none() {
        let text = serde_json::to_string_pretty(&reply.body).unwrap_or_default();
        println!("{text}");
        return Ok(if reply.status < 400 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let code = reply
        .body
        .get("error")
        .and_then(|v| v.as_str())
        .unwrap_or("error");
    let message = reply
        .body
        .get("message")
        .and_then(|v| v.as_str())
        .unwrap_or("the operation failed");
    eprintln!("error[{code}]: {message}");
    Ok(ExitCode::from(1))
}
