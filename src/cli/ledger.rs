//! `tollgate ledger …`: the payment ledger from the command line — list, show, bundles,
//! export, verify.
//!
//! Like `accounts|keys|credits`, each command reads the store directly when no sidecar holds
//! it, and otherwise asks the running sidecar's admin API (same answers either way). Listings
//! print JSON; `export` writes CSV or JSON as it reads (to stdout, or `--output`, which appears
//! only once complete); `verify` prints a summary and the breaks (`--json` for machines) and
//! exits 1 when any invariant is broken.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use alloy::primitives::Address;
use clap::Subcommand;
use serde_json::Value;

use super::Failed;
use super::admin::{Common, admin_request, config, execute, print, reply, runtime};
use crate::admin::{self, Export, Op};
use crate::ledger::export::{self, Format};
use crate::ledger::time::parse_instant;
use crate::store::Store;
use crate::store::ledger::{Query, State};

/// The payment ledger: every x402 payment admitted and its settlement.
#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
    #[command(flatten)]
    common: Common,
}

/// Which entries: every option narrows.
#[derive(Debug, Clone, clap::Args)]
struct Filter {
    /// Recorded at or after this instant: RFC 3339 (2026-11-30T12:00:00Z, 2026-11-30) or Unix
    /// seconds.
    #[arg(long, value_name = "WHEN", value_parser = parse_instant)]
    from: Option<u64>,
    /// Recorded before this instant (exclusive), written like --from.
    #[arg(long, value_name = "WHEN", value_parser = parse_instant)]
    to: Option<u64>,
    /// The buyer: the payer's address.
    #[arg(long, value_name = "ADDRESS", value_parser = parse_address)]
    buyer: Option<Address>,
    /// The route as the policy names it: "GET /v1/forecast/{city}".
    #[arg(long)]
    route: Option<String>,
    /// recorded, queued, submitted, confirmed, failed, refunded or unresolved.
    #[arg(long, value_parser = parse_state)]
    state: Option<State>,
    /// Entries of this settlement bundle.
    #[arg(long, value_name = "ID")]
    bundle: Option<u64>,
}

impl Filter {
    fn query(self, after: Option<u64>) -> Query {
        Query {
            from: self.from,
            to: self.to,
            buyer: self.buyer,
            route: self.route,
            state: self.state,
            bundle: self.bundle,
            after,
        }
    }
}

fn parse_address(text: &str) -> Result<Address, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an address (0x and 40 hex digits)"))
}

fn parse_state(text: &str) -> Result<State, String> {
    State::parse(text).ok_or_else(|| {
        let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
        format!("`{text}` is not a state: {}", states.join(", "))
    })
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// List payment entries with their current status, oldest first, a page at a time.
    List {
        #[command(flatten)]
        filter: Filter,
        /// Show entries with a sequence number above this one (the previous page's
        /// `next_after`).
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = admin::DEFAULT_PAGE)]
        limit: usize,
    },
    /// One entry, its status and every fact about it (its whole history).
    Show {
        /// The entry's sequence number.
        seq: u64,
    },
    /// List settlement bundles, oldest first.
    Bundles {
        /// Show bundles with an id above this one (paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = admin::DEFAULT_PAGE)]
        limit: usize,
    },
    /// One bundle: its entries, their count and total, and the total per state.
    Bundle {
        /// The bundle id.
        id: u64,
    },
    /// The reconciliation export: one row per paid request, CSV (RFC 4180) or JSON with
    /// totals; with --rates, fiat columns computed exactly from the operator's rate table.
    Export {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, value_parser = ["csv", "json"], default_value = "csv")]
        format: String,
        /// Rate table (CSV with the header currency,rate,source,as_of; rate = units of the
        /// currency per one unit of the payment asset).
        #[arg(long, value_name = "FILE")]
        rates: Option<PathBuf>,
        /// The fiat currency, from the rate table [default: EUR].
        #[arg(long, requires = "rates")]
        currency: Option<String>,
        /// Write here instead of stdout; the file appears only once the export is complete.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Check every invariant of the payment and credit ledgers; exit 1 naming each break.
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn ledger(args: LedgerArgs) -> Result<ExitCode, Failed> {
    let common = &args.common;
    match args.command {
        LedgerCommand::List {
            filter,
            after,
            limit,
        } => execute(
            common,
            Op::Payments {
                query: filter.query(after),
                limit: limit.clamp(1, admin::MAX_PAGE),
            },
        ),
        LedgerCommand::Show { seq } => execute(common, Op::Payment { seq }),
        LedgerCommand::Bundles { after, limit } => execute(common, Op::Bundles { after, limit }),
        LedgerCommand::Bundle { id } => execute(common, Op::Bundle { id }),
        LedgerCommand::Verify { json } => verify(common, json),
        LedgerCommand::Export {
            filter,
            format,
            rates,
            currency,
            output,
        } => {
            let format = Format::parse(&format).unwrap_or(Format::Csv);
            let text =
                match &rates {
                    Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                        format!("cannot read the rate table {}: {e}", path.display())
                    })?),
                    None => None,
                };
            let export = Export {
                query: filter.query(None),
                format,
                currency: currency.map(|c| c.to_ascii_uppercase()),
                rates: text,
            };
            // The table is checked here first, so a mistake names the operator's file.
            let origin = rates
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let rate = export.rate_table(&origin).map_err(|reply| {
                reply
                    .body
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("the rate table cannot be used")
                    .to_string()
            })?;
            run_export(common, &export, rate, output.as_deref())
        }
    }
}

/// Where an export goes: stdout, or a file that takes its name only once complete.
struct Sink {
    out: BufWriter<Box<dyn Write>>,
    /// (partial file, final name)
    file: Option<(PathBuf, PathBuf)>,
}

impl Sink {
    fn open(output: Option<&Path>) -> Result<Sink, Failed> {
        let (out, file): (Box<dyn Write>, _) = match output {
            None => (Box::new(io::stdout().lock()), None),
            Some(path) => {
                let mut partial = path.as_os_str().to_owned();
                partial.push(".partial");
                let partial = PathBuf::from(partial);
                let f = File::create(&partial)
                    .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
                (Box::new(f), Some((partial, path.to_path_buf())))
            }
        };
        Ok(Sink {
            out: BufWriter::with_capacity(1 << 16, out),
            file,
        })
    }

    fn finish(self) -> Result<(), Failed> {
        let Sink { mut out, file } = self;
        out.flush()
            .map_err(|e| format!("cannot write the export: {e}"))?;
        drop(out);
        if let Some((partial, path)) = file {
            std::fs::rename(&partial, &path)
                .map_err(|e| format!("cannot name the export {}: {e}", path.display()))?;
        }
        Ok(())
    }

    fn abandon(self) {
        if let Some((partial, _)) = &self.file {
            let _ = std::fs::remove_file(partial);
        }
    }
}

fn run_export(
    common: &Common,
    export: &Export,
    rate: Option<crate::ledger::rates::Rate>,
    output: Option<&Path>,
) -> Result<ExitCode, Failed> {
    let config = config(common)?;
    let mut sink = Sink::open(output)?;
    let result = match Store::open(&config.store) {
        Ok(store) => export::export(
            &store,
            &export.query,
            export.format,
            rate.as_ref(),
            &mut sink.out,
        )
        .map(|summary| {
            let currency = rate.as_ref().map_or(String::new(), |r| {
                format!(
                    " with {} at {} ({}, {})",
                    r.currency, r.text, r.source, r.as_of
                )
            });
            eprintln!("exported {} entries{currency}", summary.count);
            ExitCode::SUCCESS
        })
        .map_err(|e| format!("the export stopped: {e}")),
        Err(e) if e.in_use() => {
            runtime().and_then(|rt| rt.block_on(from_api(&config, export, &mut sink.out)))
        }
        Err(e) => Err(format!(
            "cannot open the store at {}: {e}",
            config.store.display()
        )),
    };
    match result {
        Ok(code) if code == ExitCode::SUCCESS => {
            sink.finish()?;
            Ok(code)
        }
        other => {
            sink.abandon();
            other
        }
    }
}

/// Streams the export from the running sidecar's admin API into `out`.
async fn from_api(
    config: &crate::config::Config,
    export: &Export,
    out: &mut impl Write,
) -> Result<ExitCode, Failed> {
    let (method, target, body) = export.to_http();
    let (mut request, address) = admin_request(config, method, &target, None)?;
    if let Some(body) = body {
        request = request.header("content-type", "text/csv").body(body);
    }
    let mut response = request.send().await.map_err(|e| {
        format!(
            "a sidecar holds the store, but its admin API at http://{address} did not answer: {e}"
        )
    })?;
    let status = response.status().as_u16();
    if status >= 400 {
        let body = response
            .json()
            .await
            .map_err(|e| format!("the admin API answered {status} without JSON: {e}"))?;
        return print(&crate::admin::Reply { status, body });
    }
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("the export from the admin API stopped: {e}"))?
    {
        out.write_all(&chunk)
            .map_err(|e| format!("cannot write the export: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(common: &Common, json: bool) -> Result<ExitCode, Failed> {
    let reply = reply(common, Op::Verify)?;
    if reply.body.get("error").is_some() {
        return print(&reply);
    }
    let consistent = reply.body.get("consistent").and_then(Value::as_bool) == Some(true);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply.body).unwrap_or_default()
        );
    } else {
        print!("{}", human(&reply.body));
    }
    Ok(if consistent {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The verify report in words.
fn human(report: &Value) -> String {
    let n = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).unwrap_or(0);
    let s = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let plural = |count: u64, word: &str| {
        if count == 1 {
            format!("{count} {word}")
        } else {
            format!("{count} {word}s")
        }
    };
    let mut out = format!(
        "payment ledger: {}, {}, {}\n",
        plural(n(report, "entries"), "entry").replace("entrys", "entries"),
        plural(n(report, "facts"), "fact"),
        plural(n(report, "bundles"), "bundle"),
    );
    if let Some(states) = report.get("by_state").and_then(Value::as_object) {
        let parts: Vec<String> = State::ALL
            .iter()
            .map(|st| {
                let count = states.get(st.as_str()).and_then(Value::as_u64).unwrap_or(0);
                format!("{} {count}", st.as_str())
            })
            .collect();
        out.push_str(&format!("  by state: {}\n", parts.join(", ")));
    }
    let unsettled = report
        .get("unsettled")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if unsettled.is_empty() {
        out.push_str("  unsettled: nothing\n");
    }
    for u in &unsettled {
        out.push_str(&format!(
            "  unsettled: {} {} on {} ({}) in {}\n",
            s(u, "amount"),
            s(u, "symbol"),
            s(u, "network"),
            s(u, "asset"),
            plural(n(u, "count"), "entry").replace("entrys", "entries"),
        ));
    }
    if let Some(credits) = report.get("credits") {
        out.push_str(&format!(
            "credit ledger: {}, {}\n",
            plural(n(credits, "accounts"), "account"),
            plural(n(credits, "facts"), "fact"),
        ));
    }
    let breaks = report
        .get("breaks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if breaks.is_empty() {
        out.push_str("ok: every invariant holds\n");
    } else {
        out.push_str(&format!(
            "BROKEN: {}\n",
            plural(u64::try_from(breaks.len()).unwrap_or(u64::MAX), "break")
        ));
        for b in &breaks {
            out.push_str(&format!("  [{}] {}\n", s(b, "kind"), s(b, "message")));
        }
    }
    out
}
