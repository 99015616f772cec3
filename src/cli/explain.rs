//! `tollgate explain`: what one request would get from a policy, and why.

use std::path::PathBuf;
use std::process::ExitCode;

use alloy::primitives::Address;

use super::{Failed, style};
use crate::policy::{self, Buyer, Outcome, Policy, Route, Timing, routes::split_path};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy file to ask
    #[arg(long, value_name = "PATH")]
    policy: PathBuf,
    /// HTTP method, e.g. GET
    method: String,
    /// The request URL (`https://api.example.com/v1/x?q=1`) or just its path (`/v1/x`)
    url: String,
    /// A request header, `name: value` (repeatable); e.g. -H 'x-api-key: tg_…' or -H 'X-PAYMENT: …'
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The prepaid balance, in credits, of the key sent with the request
    #[arg(long, value_name = "CREDITS")]
    balance: Option<u128>,
    /// The address an x402 payment comes from (for allow/deny lists)
    #[arg(long, value_name = "0x…")]
    payer: Option<Address>,
}

pub fn run(args: Args) -> Result<ExitCode, Failed> {
    let policy = match policy::load(&args.policy) {
        Ok(p) => p,
        Err(policy::LoadError::Invalid(checked)) => {
            eprint!("{}", checked.render(style()));
            return Err(format!(
                "{} does not validate; run `tollgate check {}`",
                args.policy.display(),
                args.policy.display()
            ));
        }
        Err(e) => return Err(e.to_string()),
    };
    let target = target_of(&args.url)?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h:?} is not `name: value`"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let case = policy::cases::Case {
        name: String::new(),
        origin: String::new(),
        method: args.method.clone(),
        target,
        headers,
        payer: args.payer,
        balance: None,
        expects: Vec::new(),
    };
    let request = case.request(&policy);
    let decision = policy::decide(
        &policy,
        &request,
        &Buyer {
            payer: args.payer,
            prepaid_balance: args.balance,
        },
    );

    let mut out = Vec::new();
    out.push(("request", format!("{} {}", request.method, request.target)));
    out.push((
        "policy",
        format!(
            "{} (service {:?}, version {})",
            policy.origin, policy.service, policy.version
        ),
    ));
    let credentials = match (request.api_key, request.payment) {
        (false, None) => "none".to_string(),
        (true, None) => "API key".to_string(),
        (false, Some(v)) => format!("x402 payment ({v:?} header)"),
        (true, Some(v)) => format!("API key and x402 payment ({v:?} header)"),
    };
    out.push(("carries", credentials));
    match decision.route {
        None => out.push(("route", "none matches".to_string())),
        Some(route) => describe_route(&policy, route, request.target, &mut out),
    }
    let action = match &decision.outcome {
        Outcome::Free | Outcome::Pass => "forward to the upstream, free".to_string(),
        Outcome::Deny => "403 Forbidden".to_string(),
        Outcome::BadRequest(e) => format!("400 Bad Request: {e}"),
        Outcome::Challenge { hint: Some(_) } => {
            "402 Payment Required, hint credits_exhausted".to_string()
        }
        Outcome::Challenge { hint: None } => "402 Payment Required".to_string(),
        Outcome::Prepaid { credits } => format!(
            "debit {credits} credit{} from the key's account, then forward",
            if *credits == 1 { "" } else { "s" }
        ),
        Outcome::X402 => "verify the payment against the offers above, then forward".to_string(),
    };
    out.push((
        "decision",
        format!("{} — {action}", decision.outcome.name()),
    ));
    out.push(("because", decision.why.describe(decision.route, &policy)));
    for (label, text) in out {
        let mut lines = text.lines();
        println!("{label:<9} {}", lines.next().unwrap_or(""));
        for line in lines {
            println!("{:<9} {line}", "");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `upgrade` allows on a route, and what a paid one's price then covers.
fn upgrade_line(route: &Route, paid: bool) -> Option<String> {
    if route.upgrade.is_empty() {
        return None;
    }
    let protocols = route.upgrade.join(", ");
    Some(if paid {
        format!(
            "{protocols} allowed, priced per connection: the price pays for the whole upgraded connection, however long it stays open"
        )
    } else {
        format!("{protocols} allowed; the upgraded connection is free")
    })
}

/// Path and query of a URL or a path.
fn target_of(url: &str) -> Result<String, Failed> {
    if url.starts_with('/') {
        return Ok(url.to_string());
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is neither a URL (http://…) nor a path (/…)"))?;
    Ok(rest.find(['/', '?']).map_or_else(
        || "/".to_string(),
        |i| {
            let t = rest.get(i..).unwrap_or("/");
            if t.starts_with('?') {
                format!("/{t}")
            } else {
                t.to_string()
            }
        },
    ))
}

fn describe_route(
    policy: &Policy,
    route: &Route,
    target: &str,
    out: &mut Vec<(&'static str, String)>,
) {
    out.push((
        "route",
        format!("{}  ({}:{})", route.display(), policy.origin, route.line),
    ));
    if let Ok(segments) = split_path(target) {
        let captures = route.pattern.captures(&segments);
        if !captures.is_empty() {
            out.push((
                "params",
                captures
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
    }
    let Some(price) = route.price() else {
        out.extend(upgrade_line(route, false).map(|line| ("upgrade", line)));
        return;
    };
    let mut lines = Vec::new();
    for offer in &price.offers {
        let Some(network) = policy.networks.get(offer.network) else {
            continue;
        };
        lines.push(format!(
            "x402     {} {} on {} ({}) = {} atomic units, asset {}",
            crate::money::format_atomic(offer.amount, offer.asset.decimals),
            offer.asset.symbol,
            network.name,
            network.caip2(),
            offer.amount,
            offer.asset.address
        ));
    }
    if let (Some(credits), Some(prepaid)) = (price.credits, &policy.prepaid) {
        lines.push(format!(
            "prepaid  {credits} credit{} from the key in `{}`",
            if credits == 1 { "" } else { "s" },
            prepaid.header
        ));
    }
    out.push(("price", lines.join("\n")));
    out.extend(upgrade_line(route, true).map(|line| ("upgrade", line)));
    if let Some(credits) = route.sells {
        out.push((
            "sells",
            format!(
                "{credits} credits to the caller's key (or a new key), answered by tollgate once the payment settles"
            ),
        ));
    }
    let mut terms = vec![format!("prefer {}", route.prefer.as_str())];
    if route.refund_on_5xx {
        terms.push("refund on 5xx".into());
    }
    terms.push(format!(
        "x402 authorizations valid for {}s",
        route.timeout_secs
    ));
    terms.push(match &route.settle {
        Timing::BeforeResponse => "settle before response".into(),
        Timing::AfterResponse => "settle after response".into(),
        Timing::Deferred(_) => "settle deferred, in bundles".into(),
    });
    out.push(("terms", terms.join("; ")));
    let l = &route.limits;
    let mut limits = Vec::new();
    if let Some(r) = l.requests {
        limits.push(format!(
            "{} requests {}",
            r.count,
            policy::model::window_text(r.window_secs)
        ));
    }
    for s in &l.spend {
        limits.push(format!(
            "{} {}",
            s.max,
            policy::model::window_text(s.window_secs)
        ));
    }
    for u in &l.unsettled {
        limits.push(format!("{u} unsettled"));
    }
    out.push((
        "limits",
        if limits.is_empty() {
            "none".into()
        } else {
            limits.join("; ")
        },
    ));
    let p = &route.payers;
    if p.allow.is_some() || !p.deny.is_empty() {
        let allow = p.allow.as_ref().map_or_else(
            || "any".to_string(),
            |a| {
                a.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        let deny = if p.deny.is_empty() {
            "none".to_string()
        } else {
            p.deny
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(("payers", format!("allow {allow}; deny {deny}")));
    }
}
