//! The simulated world: nodes, network, clock, faults and the checks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::fmt;

use auticuro::ledger::{
    AccountId, Amount, Command, CommandKind, Currency, HoldState, Ledger, Leg, LegState, Limits,
    Metadata, Owner, RequestId, TxnId,
};
use marker::protocol::{Answer, Drive, Step};
use marker::saga::{
    self, AbortReason, CoordinatorCommand, CoordinatorResponse, Decision, NewTransaction,
    Transaction,
};

use super::rng::Rng;

/// How long the coordinator waits for a shard's answer before resending.
const RPC_TIMEOUT_MS: i64 = 40;
/// How long a client waits for an outcome before resending its request.
const CLIENT_TIMEOUT_MS: i64 = 500;
/// How long reservations may take (`decide_by` = begin + this).
const RESERVE_TIMEOUT_MS: i64 = 300;
/// A held leg older than this (shard clock) makes the shard ask its owner coordinator.
const STALE_AFTER_MS: i64 = 400;
const RESOLVER_INTERVAL_MS: i64 = 100;
/// Clocks are off by up to this much, either way.
const SKEW_MAX_MS: i64 = 250;
const INITIAL_BALANCE: i128 = 1_000;
const OWNER: Owner = Owner {
    coordinator_shard_id: 1,
    epoch: 1,
};
/// Events kept for the report of a failure.
const TRACE_KEPT: usize = 60;

#[derive(Clone, Debug)]
pub struct Config {
    pub storage_shards: usize,
    pub accounts_per_shard: usize,
    pub clients: usize,
    pub payments_per_client: usize,
    /// Virtual time with faults, then they stop.
    pub fault_ms: i64,
    /// Virtual time after the faults within which everything must reach its outcome.
    pub liveness_ms: i64,
    /// Print every event as it happens.
    pub trace: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            storage_shards: 3,
            accounts_per_shard: 3,
            clients: 4,
            payments_per_client: 10,
            fault_ms: 5_000,
            liveness_ms: 60_000,
            trace: false,
        }
    }
}

/// What one seed did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub payments: usize,
    pub committed: usize,
    pub aborted: usize,
    /// Authorization holds placed, and how many of them a transaction captured.
    pub holds: usize,
    pub captured: usize,
    pub faults: BTreeMap<&'static str, u64>,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub events: u64,
    /// Virtual time at which everything had reached its outcome.
    pub quiet_at_ms: i64,
}

/// A broken invariant, or a transaction that never reached its outcome.
#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub at_ms: i64,
    pub event: u64,
    pub reason: String,
    /// The last events before the failure.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} failed at {} ms (event {}): {}",
            self.seed, self.at_ms, self.event, self.reason
        )?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "reproduce: cargo run -p reliability --bin simulate -- --seed {} --trace",
            self.seed
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Client(usize),
    Coordinator,
    Shard(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Committed,
    Aborted,
    Pending,
    KeyReused,
}

fn status_of(transaction: Option<&Transaction>) -> Status {
    match transaction.and_then(|t| t.decision.as_ref()) {
        Some(Decision::Commit) => Status::Committed,
        Some(Decision::Abort { .. }) => Status::Aborted,
        None => Status::Pending,
    }
}

#[derive(Clone, Debug)]
enum Message {
    Submit {
        client: usize,
        new: Box<NewTransaction>,
    },
    Outcome {
        txn_id: TxnId,
        status: Status,
    },
    /// A command for a storage shard, answered to `from`.
    Execute {
        from: Node,
        command: Command,
    },
    Executed {
        shard_id: u32,
        txn_id: TxnId,
        request_id: RequestId,
        answer: Answer,
    },
    Resolve {
        shard: usize,
        txn_id: TxnId,
    },
    Resolved {
        txn_id: TxnId,
        status: Status,
    },
}

#[derive(Debug)]
enum Timer {
    /// Take the transaction's next step.
    Continue,
    /// Resend what it waits for, or give up a reservation past its deadline.
    Resend,
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: Node,
        message: Message,
    },
    ClientTick {
        client: usize,
        generation: u64,
    },
    /// A coordinator timer, ignored once the coordinator has crashed since it was set.
    Timer {
        incarnation: u64,
        txn_id: TxnId,
        timer: Timer,
    },
    ResolverTick {
        shard: usize,
    },
    Fault,
    Restart(Node),
    Heal(Node, Node),
    EndFaults,
}

struct Shard {
    id: u32,
    ledger: Ledger,
    up: bool,
    skew: i64,
}

/// A step sent and not answered yet.
enum Waiting {
    Execute {
        shard_id: u32,
        command: Command,
        deadline_ms: Option<i64>,
    },
    Settle(BTreeMap<u32, Command>),
}

#[derive(Default)]
struct Driving {
    drive: Drive,
    waiting: Option<Waiting>,
}

struct CoordinatorNode {
    /// Durable: the replicated log's state.
    saga: saga::Coordinator,
    up: bool,
    skew: i64,
    /// Bumped by every crash; timers of an earlier life are ignored.
    incarnation: u64,
    /// Volatile: lost in a crash.
    driving: BTreeMap<TxnId, Driving>,
    waiting_clients: BTreeMap<TxnId, BTreeSet<usize>>,
}

/// One request a client makes and repeats until it has a final answer.
#[derive(Clone, Debug)]
enum Request {
    /// A transaction through the coordinator, with its idempotency key.
    Submit(NewTransaction),
    /// A command straight to a storage shard (authorizing or voiding a hold), with its
    /// request id.
    Direct { shard: usize, command: Command },
}

struct Client {
    requests: VecDeque<Request>,
    current: Option<Request>,
    generation: u64,
}

struct World {
    seed: u64,
    config: Config,
    rng: Rng,
    now: i64,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    shards: Vec<Shard>,
    coordinator: CoordinatorNode,
    clients: Vec<Client>,
    shard_of: BTreeMap<AccountId, u32>,
    customers: Vec<AccountId>,
    partitions: BTreeSet<(Node, Node)>,
    faults_on: bool,
    loss: f64,
    duplication: f64,
    /// Every transaction a client submitted, with its legs.
    submitted: BTreeMap<TxnId, Vec<Leg>>,
    /// Every authorization hold: its shard (index) and the transaction that captures it.
    holds: BTreeMap<TxnId, (usize, TxnId)>,
    /// The first decision seen for each transaction.
    decisions: BTreeMap<TxnId, Decision>,
    /// What clients were told.
    acknowledged: BTreeMap<TxnId, Status>,
    report: Report,
    trace: VecDeque<String>,
}

fn usd() -> Currency {
    Currency::parse("USD").expect("a valid currency")
}

fn id(text: &str) -> AccountId {
    AccountId::parse(text).expect("a valid account id")
}

fn request_id(text: &str) -> RequestId {
    RequestId::parse(text).expect("a valid request id")
}

fn leg(account_id: &AccountId, amount: i128) -> Leg {
    Leg {
        account_id: account_id.clone(),
        amount: Amount(amount),
        currency: usd(),
    }
}

fn funding(shard_id: u32) -> AccountId {
    id(&format!("sys:funding:{shard_id}"))
}

/// Runs one seed: `Ok` with what happened, or the first broken invariant.
pub fn run(seed: u64, config: &Config) -> Result<Report, Failure> {
    let mut world = World::new(seed, config.clone());
    world.run()
}

impl World {
    fn new(seed: u64, config: Config) -> World {
        let mut rng = Rng::new(seed);
        let mut shard_of = BTreeMap::new();
        let mut customers = Vec::new();
        let mut shards = Vec::new();
        for index in 0..config.storage_shards {
            let shard_id = index as u32 + 1;
            let mut ledger = Ledger::new();
            let mut setup = |name: &str, kind: CommandKind| {
                let applied = ledger.apply(
                    &Command {
                        request_id: request_id(name),
                        kind,
                    },
                    0,
                );
                assert!(applied.outcome.is_ok(), "set-up {name}: {applied:?}");
            };
            let create = |account_id: AccountId, limits: Limits| CommandKind::CreateAccount {
                account_id,
                currency: usd(),
                scale: 2,
                limits,
                metadata: Metadata::default(),
            };
            setup(
                "create-funding",
                create(funding(shard_id), Limits::UNBOUNDED),
            );
            for number in 0..config.accounts_per_shard {
                let account = id(&format!("acct-{shard_id}-{number}"));
                setup(
                    &format!("create-{account}"),
                    create(account.clone(), Limits::NO_OVERDRAFT),
                );
                setup(
                    &format!("fund-{account}"),
                    CommandKind::Batch {
                        legs: vec![
                            leg(&funding(shard_id), -INITIAL_BALANCE),
                            leg(&account, INITIAL_BALANCE),
                        ],
                        txn_id: None,
                        hold_id: None,
                        metadata: Metadata::default(),
                    },
                );
                shard_of.insert(account.clone(), shard_id);
                customers.push(account);
            }
            let skew = rng.between(-SKEW_MAX_MS, SKEW_MAX_MS);
            shards.push(Shard {
                id: shard_id,
                ledger,
                up: true,
                skew,
            });
        }
        let loss = [0.0, 0.02, 0.1][rng.below(3) as usize];
        let duplication = [0.0, 0.05, 0.2][rng.below(3) as usize];
        let skew = rng.between(-SKEW_MAX_MS, SKEW_MAX_MS);
        let mut world = World {
            seed,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            shards,
            coordinator: CoordinatorNode {
                saga: saga::Coordinator::default(),
                up: true,
                skew,
                incarnation: 0,
                driving: BTreeMap::new(),
                waiting_clients: BTreeMap::new(),
            },
            clients: Vec::new(),
            shard_of,
            customers,
            partitions: BTreeSet::new(),
            faults_on: true,
            loss,
            duplication,
            submitted: BTreeMap::new(),
            holds: BTreeMap::new(),
            decisions: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            report: Report {
                seed,
                ..Report::default()
            },
            trace: VecDeque::new(),
            config,
        };
        for client in 0..world.config.clients {
            let mut requests = VecDeque::new();
            for number in 0..world.config.payments_per_client {
                requests.extend(world.payment(client, number));
            }
            world.clients.push(Client {
                requests,
                current: None,
                generation: 0,
            });
            let at = world.rng.between(0, 50);
            world.schedule(
                at,
                Event::ClientTick {
                    client,
                    generation: 0,
                },
            );
        }
        for shard in 0..world.shards.len() {
            let at = world.rng.between(0, RESOLVER_INTERVAL_MS);
            world.schedule(at, Event::ResolverTick { shard });
        }
        let first_fault = world.rng.between(0, 100);
        world.schedule(first_fault, Event::Fault);
        world.schedule(world.config.fault_ms, Event::EndFaults);
        world
    }

    /// A random payment between two customers, sometimes with a fee to a third; some overdraw.
    /// One in four is authorized first: a hold on the payer, a capture of all of it or a part
    /// (now and then more than it, which is refused), then a void of whatever is left open.
    fn payment(&mut self, client: usize, number: usize) -> Vec<Request> {
        let count = self.customers.len() as u64;
        let payer = self.customers[self.rng.below(count) as usize].clone();
        let mut payee = payer.clone();
        while payee == payer {
            payee = self.customers[self.rng.below(count) as usize].clone();
        }
        let amount = self.rng.between(1, 600) as i128;
        let mut legs = vec![leg(&payer, -amount), leg(&payee, amount)];
        let idempotency_key = format!("client-{client}-payment-{number}");
        let mut requests = Vec::new();
        let mut hold_id = None;
        if self.rng.chance(0.25) {
            let id = TxnId::parse(&format!("h:{client}-{number}")).expect("a hold id");
            let held = (amount + self.rng.between(-30, 200) as i128).max(1);
            let shard = self.shard_of[&payer] as usize - 1;
            let place = CommandKind::PlaceHold {
                hold_id: id.clone(),
                account_id: payer.clone(),
                amount: Amount(held),
                currency: usd(),
                metadata: Metadata::default(),
            };
            requests.push(Request::Direct {
                shard,
                command: Command {
                    request_id: request_id(&format!("hold-{idempotency_key}")),
                    kind: place,
                },
            });
            hold_id = Some(id);
        } else if self.rng.chance(0.3) {
            let collector = self.customers[self.rng.below(count) as usize].clone();
            if collector != payer && collector != payee {
                let fee = self.rng.between(1, 20) as i128;
                legs[0] = leg(&payer, -amount - fee);
                legs.push(leg(&collector, fee));
            }
        }
        let txn_id = saga::txn_id_for("sim", &idempotency_key);
        if let Some(hold_id) = &hold_id {
            let shard = self.shard_of[&payer] as usize - 1;
            self.holds.insert(hold_id.clone(), (shard, txn_id.clone()));
        }
        let plan = saga::plan(&legs, |account| self.shard_of[account]);
        self.submitted.insert(txn_id.clone(), legs.clone());
        requests.push(Request::Submit(NewTransaction {
            txn_id,
            tenant_id: "sim".into(),
            idempotency_key: idempotency_key.clone(),
            legs,
            metadata: Metadata::default(),
            hold_id: hold_id.clone(),
            plan,
            reserve_timeout_ms: RESERVE_TIMEOUT_MS,
        }));
        if let Some(hold_id) = hold_id {
            requests.push(Request::Direct {
                shard: self.shard_of[&payer] as usize - 1,
                command: Command {
                    request_id: request_id(&format!("void-hold-{idempotency_key}")),
                    kind: CommandKind::VoidHold { hold_id },
                },
            });
        }
        requests
    }

    fn schedule(&mut self, at: i64, event: Event) {
        let number = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at.max(self.now), number)));
        self.events.insert(number, event);
    }

    fn fail(&self, reason: String) -> Failure {
        Failure {
            seed: self.seed,
            at_ms: self.now,
            event: self.report.events,
            reason,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    fn run(&mut self) -> Result<Report, Failure> {
        let limit_ms = self.config.fault_ms + self.config.liveness_ms;
        while let Some(Reverse((at, number))) = self.queue.pop() {
            let event = self.events.remove(&number).expect("a scheduled event");
            self.now = at;
            self.report.events += 1;
            let line = format!("{at:>6} ms  {event:?}");
            if self.config.trace {
                println!("{line}");
            }
            if self.trace.len() == TRACE_KEPT {
                self.trace.pop_front();
            }
            self.trace.push_back(line);
            let check_liveness = matches!(event, Event::ResolverTick { .. }) && !self.faults_on;
            self.handle(event);
            self.check().map_err(|reason| self.fail(reason))?;
            if check_liveness && self.quiet() {
                self.check_final().map_err(|reason| self.fail(reason))?;
                self.report.quiet_at_ms = self.now;
                self.report.payments = self.submitted.len();
                return Ok(self.report.clone());
            }
            if self.now > limit_ms {
                return Err(self.fail(format!(
                    "liveness: not everything reached its outcome {} ms after the faults stopped: {}",
                    self.config.liveness_ms,
                    self.stuck()
                )));
            }
        }
        Err(self.fail("the event queue ran dry".into()))
    }

    fn clock(&self, node: Node) -> i64 {
        match node {
            Node::Coordinator => self.now + self.coordinator.skew,
            Node::Shard(index) => self.now + self.shards[index].skew,
            Node::Client(_) => self.now,
        }
    }

    fn up(&self, node: Node) -> bool {
        match node {
            Node::Coordinator => self.coordinator.up,
            Node::Shard(index) => self.shards[index].up,
            Node::Client(_) => true,
        }
    }

    fn cut(a: Node, b: Node) -> (Node, Node) {
        (a.min(b), a.max(b))
    }

    fn send(&mut self, from: Node, to: Node, message: Message) {
        self.report.messages += 1;
        if self.partitions.contains(&Self::cut(from, to)) || self.rng.chance(self.loss) {
            self.report.lost += 1;
            return;
        }
        if self.rng.chance(self.duplication) {
            self.report.duplicated += 1;
            let at = self.now + self.rng.between(1, 80);
            self.schedule(
                at,
                Event::Deliver {
                    to,
                    message: message.clone(),
                },
            );
        }
        // Delays of up to 80 ms (rarely) reorder messages on the same link.
        let delay = if self.rng.chance(0.1) {
            self.rng.between(1, 80)
        } else {
            self.rng.between(1, 8)
        };
        self.schedule(self.now + delay, Event::Deliver { to, message });
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, message } => {
                if self.up(to) {
                    self.deliver(to, message);
                }
            }
            Event::ClientTick { client, generation } => self.client_tick(client, generation),
            Event::Timer {
                incarnation,
                txn_id,
                timer,
            } => {
                if self.coordinator.up && incarnation == self.coordinator.incarnation {
                    match timer {
                        Timer::Continue => self.advance(&txn_id),
                        Timer::Resend => self.resend(&txn_id),
                    }
                }
            }
            Event::ResolverTick { shard } => {
                self.resolve_stale(shard);
                self.schedule(
                    self.now + RESOLVER_INTERVAL_MS,
                    Event::ResolverTick { shard },
                );
            }
            Event::Fault => {
                if self.faults_on {
                    self.fault();
                    let next = self.now + self.rng.between(10, 150);
                    self.schedule(next, Event::Fault);
                }
            }
            Event::Restart(node) => self.restart(node),
            Event::Heal(a, b) => {
                self.partitions.remove(&(a, b));
            }
            Event::EndFaults => {
                self.faults_on = false;
                self.loss = 0.0;
                self.duplication = 0.0;
                self.partitions.clear();
                for node in self.nodes() {
                    if !self.up(node) {
                        self.restart(node);
                    }
                }
            }
        }
    }

    fn nodes(&self) -> Vec<Node> {
        let mut nodes = vec![Node::Coordinator];
        nodes.extend((0..self.shards.len()).map(Node::Shard));
        nodes
    }

    fn fault(&mut self) {
        let kind = match self.rng.below(6) {
            0 => {
                if self.coordinator.up {
                    self.coordinator.up = false;
                    self.coordinator.incarnation += 1;
                    self.coordinator.driving.clear();
                    self.coordinator.waiting_clients.clear();
                    let at = self.now + self.rng.between(20, 400);
                    self.schedule(at, Event::Restart(Node::Coordinator));
                }
                "coordinator crash"
            }
            1 => {
                let index = self.rng.below(self.shards.len() as u64) as usize;
                if self.shards[index].up {
                    self.shards[index].up = false;
                    let at = self.now + self.rng.between(20, 400);
                    self.schedule(at, Event::Restart(Node::Shard(index)));
                }
                "storage shard crash"
            }
            2 | 3 => {
                let shard = Node::Shard(self.rng.below(self.shards.len() as u64) as usize);
                let client = Node::Client(self.rng.below(self.clients.len() as u64) as usize);
                let other = if self.rng.chance(0.8) { shard } else { client };
                let cut = Self::cut(Node::Coordinator, other);
                self.partitions.insert(cut);
                let at = self.now + self.rng.between(50, 500);
                self.schedule(at, Event::Heal(cut.0, cut.1));
                "partition"
            }
            4 => {
                let skew = self.rng.between(-SKEW_MAX_MS, SKEW_MAX_MS);
                match self.rng.below(self.shards.len() as u64 + 1) as usize {
                    0 => self.coordinator.skew = skew,
                    index => self.shards[index - 1].skew = skew,
                }
                "clock jump"
            }
            _ => {
                self.force_abort();
                "operator force-abort"
            }
        };
        *self.report.faults.entry(kind).or_default() += 1;
    }

    fn restart(&mut self, node: Node) {
        match node {
            Node::Coordinator => {
                if self.coordinator.up {
                    return;
                }
                self.coordinator.up = true;
                // A new leader, with its own clock.
                self.coordinator.skew = self.rng.between(-SKEW_MAX_MS, SKEW_MAX_MS);
                for txn_id in self.in_flight() {
                    self.ensure_driving(&txn_id);
                }
            }
            Node::Shard(index) => self.shards[index].up = true,
            Node::Client(_) => {}
        }
    }

    // The coordinator.

    /// Transactions begun and not done, from the coordinator's log.
    fn in_flight(&self) -> Vec<TxnId> {
        self.coordinator
            .saga
            .in_flight()
            .map(|transaction| transaction.txn_id.clone())
            .collect()
    }

    fn ensure_driving(&mut self, txn_id: &TxnId) {
        let done = self
            .coordinator
            .saga
            .transaction(txn_id)
            .is_none_or(|transaction| transaction.done);
        if done || self.coordinator.driving.contains_key(txn_id) {
            return;
        }
        self.coordinator
            .driving
            .insert(txn_id.clone(), Driving::default());
        self.set_timer(self.now + 1, txn_id, Timer::Continue);
    }

    fn set_timer(&mut self, at: i64, txn_id: &TxnId, timer: Timer) {
        let incarnation = self.coordinator.incarnation;
        self.schedule(
            at,
            Event::Timer {
                incarnation,
                txn_id: txn_id.clone(),
                timer,
            },
        );
    }

    /// Writes a command into the coordinator's log and tells waiting clients about finished
    /// transactions.
    fn propose(&mut self, command: &CoordinatorCommand) -> CoordinatorResponse {
        let timestamp = self.clock(Node::Coordinator);
        let (response, _) = self.coordinator.saga.apply(command, timestamp);
        if let CoordinatorResponse::Transaction(transaction) = &response
            && transaction.done
        {
            let clients = self
                .coordinator
                .waiting_clients
                .remove(&transaction.txn_id)
                .unwrap_or_default();
            let status = status_of(Some(&**transaction));
            for client in clients {
                self.send(
                    Node::Coordinator,
                    Node::Client(client),
                    Message::Outcome {
                        txn_id: transaction.txn_id.clone(),
                        status,
                    },
                );
            }
        }
        response
    }

    /// Takes the transaction's next protocol step, unless one is still waiting for answers.
    fn advance(&mut self, txn_id: &TxnId) {
        let Some(transaction) = self.coordinator.saga.transaction(txn_id).cloned() else {
            return;
        };
        let Some(driving) = self.coordinator.driving.get(txn_id) else {
            return;
        };
        if driving.waiting.is_some() {
            return;
        }
        let step = driving.drive.next(&transaction, OWNER);
        let waiting = match step {
            Step::Finished => {
                self.coordinator.driving.remove(txn_id);
                return;
            }
            Step::Propose(commands) => {
                for command in &commands {
                    self.propose(command);
                }
                let at = self.now + self.rng.between(1, 5);
                self.set_timer(at, txn_id, Timer::Continue);
                return;
            }
            Step::Execute {
                shard_id,
                command,
                deadline_ms,
            } => Waiting::Execute {
                shard_id,
                command,
                deadline_ms,
            },
            Step::Settle(commands) => Waiting::Settle(commands.into_iter().collect()),
        };
        self.coordinator
            .driving
            .get_mut(txn_id)
            .expect("driving")
            .waiting = Some(waiting);
        self.send_waiting(txn_id);
    }

    /// Sends (again) what the transaction waits for, and sets the resend timer.
    fn send_waiting(&mut self, txn_id: &TxnId) {
        let sends: Vec<(u32, Command)> = match self
            .coordinator
            .driving
            .get(txn_id)
            .and_then(|driving| driving.waiting.as_ref())
        {
            Some(Waiting::Execute {
                shard_id, command, ..
            }) => vec![(*shard_id, command.clone())],
            Some(Waiting::Settle(commands)) => commands
                .iter()
                .map(|(shard_id, command)| (*shard_id, command.clone()))
                .collect(),
            None => return,
        };
        for (shard_id, command) in sends {
            let to = Node::Shard(shard_id as usize - 1);
            let from = Node::Coordinator;
            self.send(from, to, Message::Execute { from, command });
        }
        self.set_timer(self.now + RPC_TIMEOUT_MS, txn_id, Timer::Resend);
    }

    fn resend(&mut self, txn_id: &TxnId) {
        let clock = self.clock(Node::Coordinator);
        let Some(driving) = self.coordinator.driving.get_mut(txn_id) else {
            return;
        };
        match &driving.waiting {
            None => {}
            Some(Waiting::Execute {
                deadline_ms: Some(deadline_ms),
                ..
            }) if clock >= *deadline_ms => {
                driving.drive.expired();
                driving.waiting = None;
                self.advance(txn_id);
            }
            Some(_) => self.send_waiting(txn_id),
        }
    }

    fn answered(&mut self, txn_id: &TxnId, shard_id: u32, request_id: &RequestId, answer: &Answer) {
        let Some(transaction) = self.coordinator.saga.transaction(txn_id).cloned() else {
            return;
        };
        let Some(driving) = self.coordinator.driving.get_mut(txn_id) else {
            return;
        };
        let finished = match &mut driving.waiting {
            Some(Waiting::Execute {
                shard_id: waited_shard,
                command,
                ..
            }) if *waited_shard == shard_id && command.request_id == *request_id => {
                driving.drive.answered(&transaction, shard_id, answer);
                true
            }
            Some(Waiting::Settle(commands))
                if commands
                    .get(&shard_id)
                    .is_some_and(|command| command.request_id == *request_id) =>
            {
                driving.drive.settled(shard_id, answer);
                commands.remove(&shard_id);
                commands.is_empty()
            }
            _ => false,
        };
        if finished {
            driving.waiting = None;
            self.advance(txn_id);
        }
    }

    /// The service's abort from outside the protocol (an operator, or a shard asking about a
    /// stale hold): decide abort unless decided; a decision never changes.
    fn abort_from_outside(&mut self, txn_id: &TxnId, reason: AbortReason) -> Status {
        let response = self.propose(&CoordinatorCommand::Decide {
            txn_id: txn_id.clone(),
            decision: Decision::Abort {
                reason,
                outcome: auticuro::ledger::Outcome::Ok,
                detail_account_id: None,
            },
        });
        match response {
            CoordinatorResponse::Transaction(transaction) => {
                self.ensure_driving(txn_id);
                status_of(Some(&*transaction))
            }
            // Never begun here: nothing can ever commit it.
            _ => Status::Aborted,
        }
    }

    fn force_abort(&mut self) {
        if !self.coordinator.up {
            return;
        }
        let in_flight = self.in_flight();
        if in_flight.is_empty() {
            return;
        }
        let txn_id = in_flight[self.rng.below(in_flight.len() as u64) as usize].clone();
        self.abort_from_outside(&txn_id, AbortReason::Forced);
    }

    // Storage shards.

    fn resolve_stale(&mut self, index: usize) {
        if !self.shards[index].up {
            return;
        }
        let cutoff = self.clock(Node::Shard(index)) - STALE_AFTER_MS;
        for (txn_id, _) in self.shards[index].ledger.held_since(cutoff) {
            self.send(
                Node::Shard(index),
                Node::Coordinator,
                Message::Resolve {
                    shard: index,
                    txn_id,
                },
            );
        }
    }

    fn deliver(&mut self, to: Node, message: Message) {
        match (to, message) {
            (Node::Coordinator, Message::Submit { client, new }) => {
                let txn_id = new.txn_id.clone();
                match self.propose(&CoordinatorCommand::Begin(new)) {
                    CoordinatorResponse::Transaction(transaction) if transaction.done => {
                        self.send(
                            to,
                            Node::Client(client),
                            Message::Outcome {
                                txn_id,
                                status: status_of(Some(&transaction)),
                            },
                        );
                    }
                    CoordinatorResponse::Transaction(_) => {
                        self.coordinator
                            .waiting_clients
                            .entry(txn_id.clone())
                            .or_default()
                            .insert(client);
                        self.ensure_driving(&txn_id);
                    }
                    _ => {
                        self.send(
                            to,
                            Node::Client(client),
                            Message::Outcome {
                                txn_id,
                                status: Status::KeyReused,
                            },
                        );
                    }
                }
            }
            (
                Node::Coordinator,
                Message::Executed {
                    shard_id,
                    txn_id,
                    request_id,
                    answer,
                },
            ) => self.answered(&txn_id, shard_id, &request_id, &answer),
            (Node::Coordinator, Message::Resolve { shard, txn_id }) => {
                let status = self.abort_from_outside(&txn_id, AbortReason::ResolvedStale);
                self.send(to, Node::Shard(shard), Message::Resolved { txn_id, status });
            }
            (Node::Shard(index), Message::Execute { from, command }) => {
                let timestamp = self.clock(to);
                let shard = &mut self.shards[index];
                let applied = shard.ledger.apply(&command, timestamp);
                let shard_id = shard.id;
                let Some(txn_id) = command.kind.txn_id().cloned() else {
                    return;
                };
                self.send(
                    to,
                    from,
                    Message::Executed {
                        shard_id,
                        txn_id,
                        request_id: command.request_id,
                        answer: Answer {
                            outcome: applied.outcome,
                            seq: applied.seq,
                            detail_account_id: applied.detail_account_id,
                        },
                    },
                );
            }
            (Node::Shard(index), Message::Resolved { txn_id, status }) => {
                let commit = match status {
                    Status::Committed => true,
                    Status::Aborted => false,
                    Status::Pending | Status::KeyReused => return,
                };
                let timestamp = self.clock(to);
                let shard = &mut self.shards[index];
                let Some(record) = shard.ledger.transaction(&txn_id) else {
                    return;
                };
                let command = Command::settle(&txn_id, record.owner, shard.id, commit);
                shard.ledger.apply(&command, timestamp);
            }
            (Node::Client(client), Message::Outcome { txn_id, status }) => {
                let is_current = matches!(
                    &self.clients[client].current,
                    Some(Request::Submit(new)) if new.txn_id == txn_id
                );
                if is_current && status != Status::Pending {
                    self.acknowledged.insert(txn_id, status);
                    self.next_request(client);
                }
            }
            (Node::Client(client), Message::Executed { request_id, .. }) => {
                // A hold's authorization or void: any definite answer is final (a refused
                // authorization leaves a capture that the shard refuses in turn).
                let is_current = matches!(
                    &self.clients[client].current,
                    Some(Request::Direct { command, .. }) if command.request_id == request_id
                );
                if is_current {
                    self.next_request(client);
                }
            }
            (to, message) => panic!("{to:?} does not take {message:?}"),
        }
    }

    // Clients.

    /// The current request has its final answer: on to the next one shortly.
    fn next_request(&mut self, client: usize) {
        let state = &mut self.clients[client];
        state.current = None;
        state.generation += 1;
        let generation = state.generation;
        let at = self.now + self.rng.between(0, 20);
        self.schedule(at, Event::ClientTick { client, generation });
    }

    fn client_tick(&mut self, client: usize, generation: u64) {
        let state = &mut self.clients[client];
        if state.generation != generation {
            return;
        }
        if state.current.is_none() {
            state.current = state.requests.pop_front();
        }
        // The first send, or a retry with the same idempotency key or request id after a
        // timeout.
        let from = Node::Client(client);
        match state.current.clone() {
            None => return,
            Some(Request::Submit(new)) => self.send(
                from,
                Node::Coordinator,
                Message::Submit {
                    client,
                    new: Box::new(new),
                },
            ),
            Some(Request::Direct { shard, command }) => {
                self.send(from, Node::Shard(shard), Message::Execute { from, command })
            }
        }
        self.schedule(
            self.now + CLIENT_TIMEOUT_MS,
            Event::ClientTick { client, generation },
        );
    }

    // Checks.

    /// The protocol invariants, after every event.
    fn check(&mut self) -> Result<(), String> {
        for shard in &self.shards {
            if let Some((currency, sum)) = shard
                .ledger
                .balance_sums()
                .into_iter()
                .find(|(_, sum)| *sum != 0)
            {
                return Err(format!("shard {}: {currency} sums to {sum}", shard.id));
            }
            for account in shard.ledger.accounts() {
                let available = account.balance.0 - account.pending_out.0;
                if account
                    .limits
                    .lower
                    .is_some_and(|lower| available < lower.0)
                {
                    return Err(format!("{} is below its lower limit", account.id));
                }
            }
        }
        let customers_and_clearing: i128 = self
            .shards
            .iter()
            .flat_map(|shard| shard.ledger.accounts())
            .filter(|account| !account.id.as_str().starts_with("sys:funding:"))
            .map(|account| account.balance.0)
            .sum();
        let deposited = INITIAL_BALANCE * self.customers.len() as i128;
        if customers_and_clearing != deposited {
            return Err(format!(
                "customer and clearing balances sum to {customers_and_clearing}, {deposited} were deposited"
            ));
        }
        for txn_id in self.submitted.keys() {
            let transaction = self.coordinator.saga.transaction(txn_id);
            let decision = transaction.and_then(|t| t.decision.clone());
            match (&decision, self.decisions.get(txn_id)) {
                (Some(now), Some(first)) if now != first => {
                    return Err(format!(
                        "{txn_id}: decision changed from {first:?} to {now:?}"
                    ));
                }
                (None, Some(first)) => {
                    return Err(format!("{txn_id}: decision {first:?} was lost"));
                }
                _ => {}
            }
            let states: Vec<(u32, LegState)> = self
                .shards
                .iter()
                .filter_map(|shard| {
                    shard
                        .ledger
                        .transaction(txn_id)
                        .map(|record| (shard.id, record.state))
                })
                .collect();
            let posted = states.iter().any(|(_, state)| *state == LegState::Posted);
            let voided = states
                .iter()
                .any(|(_, state)| matches!(state, LegState::Voided | LegState::Tombstone));
            if posted && voided {
                return Err(format!(
                    "{txn_id}: posted on one shard and voided on another: {states:?}"
                ));
            }
            let committed = decision == Some(Decision::Commit);
            if posted && !committed {
                return Err(format!(
                    "{txn_id}: posted with decision {decision:?}: {states:?}"
                ));
            }
            if voided && committed {
                return Err(format!("{txn_id}: voided after a commit decision"));
            }
            let held = states.iter().any(|(_, state)| *state == LegState::Held);
            if held && transaction.is_some_and(|t| t.done) {
                return Err(format!(
                    "{txn_id}: held on a shard after it was done: {states:?}"
                ));
            }
            // A single-shard transaction moves money in one batch, request id = txn id.
            let batch = self.shards.iter().find_map(|shard| {
                shard
                    .ledger
                    .dedup_record(&RequestId::for_transaction(txn_id))
                    .map(|record| record.outcome.is_ok())
            });
            if batch == Some(true) && !committed && decision.is_some() {
                return Err(format!(
                    "{txn_id}: its batch moved money but the decision is {decision:?}"
                ));
            }
            if batch == Some(false) && committed {
                return Err(format!("{txn_id}: committed but its batch was refused"));
            }
            match (self.acknowledged.get(txn_id), &decision) {
                (Some(Status::Committed), Some(Decision::Commit))
                | (Some(Status::Aborted), Some(Decision::Abort { .. }))
                | (None, _) => {}
                (Some(told), _) => {
                    return Err(format!(
                        "{txn_id}: the client was told {told:?}, the decision is {decision:?}"
                    ));
                }
            }
            if let Some(decision) = decision {
                self.decisions.insert(txn_id.clone(), decision);
            }
        }
        for (hold_id, (shard, txn_id)) in &self.holds {
            let Some(hold) = self.shards[*shard].ledger.hold(hold_id) else {
                continue;
            };
            let transaction = self.coordinator.saga.transaction(txn_id);
            let decision = transaction.and_then(|t| t.decision.as_ref());
            match &hold.state {
                HoldState::Captured { txn_id: by, amount } => {
                    let debit = self.submitted[txn_id][0].amount.0;
                    // A single-shard capture is its batch, which comes before the decision.
                    let single = transaction.is_some_and(|t| t.is_single_shard());
                    let decided =
                        decision == Some(&Decision::Commit) || (single && decision.is_none());
                    if by != txn_id || !decided || amount.0 != -debit {
                        return Err(format!(
                            "{hold_id}: captured {amount} by {by}, decision {decision:?}, debit {debit}"
                        ));
                    }
                }
                HoldState::Capturing(by) if transaction.is_some_and(|t| t.done) => {
                    return Err(format!("{hold_id}: still capturing after {by} was done"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every client has every answer, nothing is in flight and nothing is held anywhere.
    fn quiet(&self) -> bool {
        self.clients
            .iter()
            .all(|client| client.current.is_none() && client.requests.is_empty())
            && self.coordinator.saga.in_flight_count() == 0
            && self.shards.iter().all(|shard| {
                shard
                    .ledger
                    .accounts()
                    .all(|account| account.pending_out.0 == 0 && account.pending_in.0 == 0)
            })
    }

    fn stuck(&self) -> String {
        let waiting_clients = self
            .clients
            .iter()
            .filter(|client| client.current.is_some() || !client.requests.is_empty())
            .count();
        let in_flight: Vec<String> = self
            .coordinator
            .saga
            .in_flight()
            .map(|transaction| format!("{} {:?}", transaction.txn_id, transaction.decision))
            .collect();
        let pending: Vec<String> = self
            .shards
            .iter()
            .flat_map(|shard| shard.ledger.accounts())
            .filter(|account| account.pending_out.0 != 0 || account.pending_in.0 != 0)
            .map(|account| account.id.to_string())
            .collect();
        format!(
            "{waiting_clients} clients without an answer, in flight {in_flight:?}, pending amounts on {pending:?}"
        )
    }

    /// After the liveness phase: every balance is the initial one plus exactly the committed
    /// transactions' legs (none missing, none applied twice), and clients heard every outcome.
    fn check_final(&mut self) -> Result<(), String> {
        let mut expected: BTreeMap<AccountId, i128> = self
            .customers
            .iter()
            .map(|account| (account.clone(), INITIAL_BALANCE))
            .collect();
        for (txn_id, legs) in &self.submitted {
            match self.acknowledged.get(txn_id) {
                Some(Status::Committed) => self.report.committed += 1,
                Some(Status::Aborted) => self.report.aborted += 1,
                other => return Err(format!("{txn_id}: the client's answer is {other:?}")),
            }
            if self.decisions.get(txn_id) == Some(&Decision::Commit) {
                for leg in legs {
                    *expected.get_mut(&leg.account_id).expect("a customer") += leg.amount.0;
                }
            }
        }
        for (hold_id, (shard, _)) in &self.holds {
            match self.shards[*shard]
                .ledger
                .hold(hold_id)
                .map(|hold| &hold.state)
            {
                Some(HoldState::Captured { .. }) => self.report.captured += 1,
                Some(HoldState::Voided) | None => {}
                Some(state) => return Err(format!("{hold_id} left {state:?}")),
            }
        }
        self.report.holds = self.holds.len();
        for shard in &self.shards {
            for account in shard.ledger.accounts() {
                if let Some(want) = expected.get(&account.id)
                    && account.balance.0 != *want
                {
                    return Err(format!(
                        "{}: balance {}, the decisions say {want}",
                        account.id, account.balance
                    ));
                }
            }
        }
        Ok(())
    }
}
