/**
 * The unix socket the CNI plugin and the CLI talk to: newline-delimited JSON,
 * one reply line per request line, in order (protocol.ts).
 */
import { chmodSync, existsSync, mkdirSync, statSync, unlinkSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';

const MAX_LINE = 1 << 20;

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

export class SocketServer {
  private readonly conns = new Set<Socket>();
  private ino: number | undefined;

  private constructor(private readonly server: Server, readonly path: string) {}

  /**
   * Listens at path with mode 0600 (only root may speak the protocol). The
   * umask makes the socket 0600 from its creation, not just after a chmod.
   */
  static async listen(path: string, handle: (line: string) => string): Promise<SocketServer> {
    if (await socketInUse(path)) {
      throw new Error(`another xmasq-agent already serves ${path}: stop it first, or give this one its own --socket, --pin-dir and --state-dir`);
    }
    const dir = dirname(path);
    if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
    if (existsSync(path)) unlinkSync(path); // left by an agent that died: nobody answered on it
    const server = createServer();
    const s = new SocketServer(server, path);
    server.on('connection', (c) => s.serve(c, handle));
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
    chmodSync(path, 0o600);
    s.ino = statSync(path).ino;
    return s;
  }

  private serve(c: Socket, handle: (line: string) => string): void {
    this.conns.add(c);
    c.setEncoding('utf8');
    let buf = '';
    c.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (line === '') continue;
        c.write(`${handle(line)}\n`);
      }
      if (buf.length > MAX_LINE) {
        c.end(`${JSON.stringify({ ok: false, error: `request line longer than ${MAX_LINE} bytes: send one JSON object per line` })}\n`);
        buf = '';
      }
    });
    c.on('error', () => {}); // a client that hung up mid-reply is its own problem
    c.on('close', () => this.conns.delete(c));
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
