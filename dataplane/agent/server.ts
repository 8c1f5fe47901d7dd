/**
 * The unix socket the CNI plugin and the CLI talk to: newline-delimited JSON,
 * one reply line per request line, in order (protocol.ts).
 *
 * Whatever a client sends, the worst it gets is an error reply and a closed
 * connection: the agent keeps the datapath, so no input may crash it. Every
 * resource a client can make the agent hold is bounded here — the bytes of
 * one request line, the nesting of its JSON, the connections open at once,
 * how long a connection may sit idle, and the replies queued for a client
 * that does not read them.
 */
import { chmodSync, existsSync, mkdirSync, statSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import type { Log } from './log.ts';

export interface SocketLimits {
  /** Longest request line, in bytes, without its newline. */
  maxLineBytes: number;
  /** Deepest nesting of arrays and objects in a request. */
  maxDepth: number;
  /** Connections served at once; more are answered with an error and closed. */
  maxConnections: number;
  /** A connection with no request, and no reply taken by the client, for this long is closed. */
  idleSeconds: number;
}

/*
 * The largest real request is a pod add or a policy rule: a few hundred bytes,
 * three levels deep. The bounds leave room for clients we do not know of and
 * stay far from what hurts: V8's JSON.stringify recurses, and a few thousand
 * levels overflow its stack (issue 14: a 20 KB line of nested arrays in `seq`
 * did, in the reply).
 */
export const LINE_LIMIT = 1 << 20;
export const DEPTH_LIMIT = 32;

/** Why the server refused a request or dropped a connection, for the log and /metrics. */
export type Refusal = 'connections' | 'line' | 'depth' | 'idle' | 'unread' | 'handler';
export const REFUSALS: readonly Refusal[] = ['connections', 'line', 'depth', 'idle', 'unread', 'handler'];

/** The protocol's error reply, as one line. */
export function errorLine(error: string): string {
  return `${JSON.stringify({ ok: false, error })}\n`;
}

/**
 * Whether JSON text nests arrays and objects deeper than limit, found without
 * recursion (and without parsing) so that a hostile line costs one pass over
 * its characters. For valid JSON the count is exact: strings are skipped with
 * their escapes, as the parser does. Invalid JSON may count wrong, but the
 * parser refuses it anyway.
 */
export function nestedDeeperThan(text: string, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text.charCodeAt(i);
    if (inString) {
      if (ch === 0x5c) i++; // a backslash: the next character is escaped, even a quote
      else if (ch === 0x22) inString = false;
    } else if (ch === 0x22) {
      inString = true;
    } else if (ch === 0x5b || ch === 0x7b) {
      if (++depth > limit) return true;
    } else if (ch === 0x5d || ch === 0x7d) {
      depth--;
    }
  }
  return false;
}

/** Whether something answers at a unix socket path (another agent). */
export function socketInUse(path: string): Promise<boolean> {
  if (!existsSync(path)) return Promise.resolve(false);
  return new Promise((resolve) => {
    const s = createConnection(path);
    const done = (v: boolean) => {
      s.destroy();
      resolve(v);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    setTimeout(() => done(false), 2000).unref();
  });
}

/** How long a refused client gets to take its error reply and close before the connection goes anyway. */
const FAREWELL_MS = 2000;
/** What a refused client may still send, read and dropped, before the connection goes anyway. */
const FAREWELL_BYTES = 64 << 10;
/** One log line per kind of refusal per this long: a flood of bad clients must not flood the log too. */
const LOG_EVERY_MS = 10_000;

export class SocketServer {
  private readonly conns = new Set<Socket>();
  private ino: number | undefined;
  private readonly refused = Object.fromEntries(REFUSALS.map((r) => [r, 0])) as Record<Refusal, number>;
  private readonly lastLogged = new Map<Refusal, { at: number; count: number }>();
  /** Connections given their last reply: whatever else they send is not read. */
  private readonly closing = new WeakSet<Socket>();

  private constructor(
    private readonly server: Server,
    readonly path: string,
    private readonly handle: (line: string) => string,
    private readonly log: Log,
    readonly limits: SocketLimits,
  ) {}

  /**
   * Listens at path with mode 0600 (only root may speak the protocol). The
   * umask makes the socket 0600 from its creation, not just after a chmod.
   * handle answers one request line with one reply line (without its newline).
   */
  static async listen(path: string, handle: (line: string) => string, log: Log, limits: SocketLimits): Promise<SocketServer> {
    if (await socketInUse(path)) {
      throw new Error(`another xmasq-agent already serves ${path}: stop it first, or give this one its own --socket, --pin-dir and --state-dir`);
    }
    const dir = dirname(path);
    if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
    if (existsSync(path)) unlinkSync(path); // left by an agent that died: nobody answered on it
    const server = createServer();
    const s = new SocketServer(server, path, handle, log, limits);
    server.on('connection', (c) => s.accept(c));
    await new Promise<void>((resolve, reject) => {
      const old = process.umask(0o177);
      server.once('error', (e: NodeJS.ErrnoException) => {
        process.umask(old);
        reject(new Error(`--socket ${path}: cannot listen (${e.code ?? e.message}); choose another path with --socket`));
      });
      server.listen(path, () => {
        process.umask(old);
        resolve();
      });
    });
    // A failed accept (EMFILE under a flood of connections) is an 'error' on
    // the server; unheard, it would be an uncaught exception and stop the agent.
    server.removeAllListeners('error');
    server.on('error', (e: NodeJS.ErrnoException) => log.warn(`socket ${path}: ${e.code ?? e.message} (the agent goes on serving)`));
    chmodSync(path, 0o600);
    s.ino = statSync(path).ino;
    return s;
  }

  /** Connections open now, and what was refused since the start, by reason. */
  stats(): { connections: number; refused: Record<Refusal, number> } {
    return { connections: this.conns.size, refused: { ...this.refused } };
  }

  /** Counts a refusal and logs it, at most once per LOG_EVERY_MS per reason, with how many went unlogged. */
  private refuse(reason: Refusal, msg: string): void {
    this.refused[reason]++;
    const now = Date.now();
    const last = this.lastLogged.get(reason);
    if (last && now - last.at < LOG_EVERY_MS) {
      last.count++;
      return;
    }
    const more = last?.count ? ` (and ${last.count} more like it in the last ${Math.round((now - last.at) / 1000)} s)` : '';
    this.lastLogged.set(reason, { at: now, count: 0 });
    if (reason === 'handler') this.log.error(`${msg}${more}`);
    else this.log.warn(`${msg}${more}`);
  }

  /**
   * Sends a last reply (if any) and ends our side; the connection goes when
   * the client closes its own, or after FAREWELL_MS or FAREWELL_BYTES more
   * from it, whatever the client does.
   *
   * Why not close at once: a client writing its request as we refuse it
   * (--socket-max-conns refuses before reading anything) would meet a closed
   * socket. Its write fails with EPIPE, and Node drops a socket whose write
   * failed before reading what is left in it: the reply saying why would be
   * lost, and the client could only report "write EPIPE". So until the
   * client closes, what it still sends is read and dropped.
   */
  private farewell(c: Socket, reply?: string): void {
    this.closing.add(c);
    if (reply === undefined || c.destroyed || !c.writable) {
      c.destroy();
      return;
    }
    c.setTimeout(0); // the idle timer's work is done: the timer below ends the farewell
    let dropped = 0;
    c.on('data', (chunk: Buffer) => {
      dropped += chunk.length;
      if (dropped > FAREWELL_BYTES) c.destroy();
    });
    c.on('end', () => c.destroy());
    c.resume();
    c.end(reply);
    setTimeout(() => c.destroy(), FAREWELL_MS).unref();
  }

  private accept(c: Socket): void {
    c.on('error', () => {}); // a client that hung up mid-reply is its own problem
    if (this.conns.size >= this.limits.maxConnections) {
      this.refuse('connections', `refused a connection: ${this.conns.size} are open, the most --socket-max-conns allows`);
      this.farewell(c, errorLine(`the agent serves at most ${this.limits.maxConnections} connections at once (--socket-max-conns): close idle ones, or retry in a moment`));
      return;
    }
    this.conns.add(c);
    c.on('close', () => this.conns.delete(c));
    try {
      this.serve(c);
    } catch (e) {
      this.failed(c, e);
    }
  }

  /** A bug in serving one connection costs that connection, never the agent. */
  private failed(c: Socket, e: unknown): void {
    this.refuse('handler', `serving a connection failed, closed it: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
    c.destroy();
  }

  private serve(c: Socket): void {
    const { maxLineBytes, idleSeconds } = this.limits;
    let buf: Buffer = Buffer.alloc(0);
    let scanned = 0; // bytes at the start of buf known to hold no newline
    let waiting = false; // replies are queued past the high-water mark: wait for 'drain'

    // Reads only as fast as the client takes its replies: once the queue of
    // replies passes the socket's high-water mark, the rest of what was read
    // waits, and nothing more is read, until the queue drains. So a client
    // that never reads holds at most a line and a reply or two in the agent,
    // and the idle timer drops it.
    const pump = () => {
      while (!waiting && !c.destroyed && !this.closing.has(c)) {
        const nl = buf.indexOf(10, scanned);
        if (nl < 0) {
          scanned = buf.length;
          if (buf.length > maxLineBytes) this.tooLong(c);
          return;
        }
        const raw = buf.subarray(0, nl);
        buf = buf.subarray(nl + 1);
        scanned = 0;
        if (raw.length > maxLineBytes) {
          this.tooLong(c);
          return;
        }
        const reply = this.answer(raw.toString('utf8').trim());
        if (reply === undefined) continue;
        if (!c.write(reply)) {
          waiting = true;
          c.pause();
          c.once('drain', () => {
            waiting = false;
            c.resume();
            guarded();
          });
        }
      }
    };
    const guarded = () => {
      try {
        pump();
      } catch (e) {
        this.failed(c, e);
      }
    };
    c.on('data', (chunk: Buffer) => {
      if (this.closing.has(c)) return;
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      // A chunk can still arrive just after a pause: keep it for after the drain.
      if (!waiting) guarded();
    });
    c.setTimeout(idleSeconds * 1000, () => {
      if (waiting || c.writableLength > 0) {
        this.refuse('unread', `dropped a client that took none of its replies for ${idleSeconds} s (--socket-idle): ${c.writableLength} bytes of replies were waiting`);
        c.destroy();
      } else {
        this.refuse('idle', `closed a connection idle for ${idleSeconds} s (--socket-idle)`);
        this.farewell(c, errorLine(`closing the connection: no request for ${idleSeconds} s (--socket-idle); connect again to send more`));
      }
    });
  }

  private tooLong(c: Socket): void {
    const max = this.limits.maxLineBytes;
    this.refuse('line', `closed a connection whose request line passed ${max} bytes`);
    this.farewell(c, errorLine(`request line longer than ${max} bytes: send one JSON object per line, each ending in a newline`));
  }

  /** The reply line to one request line, or undefined for a blank one. Never throws. */
  private answer(line: string): string | undefined {
    if (line === '') return undefined;
    const depth = this.limits.maxDepth;
    if (nestedDeeperThan(line, depth)) {
      this.refuse('depth', `refused a request nested deeper than ${depth} levels (${line.length} characters)`);
      return errorLine(`request nested deeper than ${depth} levels of arrays and objects: no request of the protocol needs more than a few; send one object per line like {"op":"status"}`);
    }
    try {
      return `${this.handle(line)}\n`;
    } catch (e) {
      // The handler answers every mistake of the client itself; reaching here is an agent bug.
      this.refuse('handler', `a request failed unexpectedly (answered with an error, the agent goes on serving): ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
      return errorLine(`the agent failed to answer this request (${e instanceof Error ? e.message : String(e)}); its log has the details`);
    }
  }

  /** Stops listening, drops open connections, and removes the socket file if it is still ours. */
  async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    try {
      if (statSync(this.path).ino === this.ino) unlinkSync(this.path);
    } catch {
      // already gone
    }
  }
}
