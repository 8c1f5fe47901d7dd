/**
 * Independent simulations on every core: a run of the simulator is one
 * thread's work (its events depend on each other, instant by instant), but a
 * study's points, or the benchmark's clusters, do not depend on each other.
 * mapInWorkers hands jobs to worker threads, a job at a time to whichever is
 * free, and gives the results back in the jobs' order: the same results as
 * running them one after another, since each job is deterministic.
 *
 * A worker module calls serveJobs(import.meta.url, handler) at its top
 * level: in a worker mapInWorkers started for that module it answers jobs,
 * anywhere else (the main thread, a test runner's worker) it does nothing, so
 * the module can be imported as any other. Workers load the TypeScript
 * sources through tsx, as the main thread does.
 */
import { availableParallelism } from 'node:os';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';

interface JobMessage { i: number; job: unknown }
interface ResultMessage { i: number; result?: unknown; error?: string }

export interface MapOptions<R> {
  /** Threads to use (default: one per core, at most one per job). */
  threads?: number;
  /** Called as each result arrives (jobs finish out of order). */
  onResult?(i: number, result: R): void;
}

/** The number of cores this process may use. */
export function cores(): number {
  return availableParallelism();
}

const MAX_THREADS = 256;

/** The tools' --threads: absent, one per core; else an integer from 1 to MAX_THREADS. What is wrong with it, as text, when it is not one. */
export function threadsOption(text: string | undefined): number | string {
  const threads = text !== undefined ? Number(text) : cores();
  return Number.isInteger(threads) && threads >= 1 && threads <= MAX_THREADS ? threads : `--threads ${text}: want an integer from 1 to ${MAX_THREADS}`;
}

/** The tsx loader, registered in a worker before its module is imported (workers do not inherit --import). */
const TSX_API = import.meta.resolve('tsx/esm/api');

function startWorker(module: URL): Worker {
  const code = `import { register } from ${JSON.stringify(TSX_API)}; register(); await import(${JSON.stringify(module.href)});`;
  return new Worker(code, { eval: true, workerData: { simJobsFor: module.href } });
}

/**
 * Runs handler(job) for every job in worker threads running `module`; the
 * results in the order of jobs. The first job that throws rejects the whole
 * map with that job's error, once the jobs the other workers hold have ended:
 * a worker is never stopped while it works, which may be while it still loads
 * its modules, and a native addon loading then (koffi, which the simulator's
 * agent imports) aborts the whole process when the thread is torn down.
 */
export function mapInWorkers<J, R>(module: URL, jobs: readonly J[], opts: MapOptions<R> = {}): Promise<R[]> {
  const threads = Math.max(1, Math.min(opts.threads ?? cores(), jobs.length));
  const results = new Array<R>(jobs.length);
  if (jobs.length === 0) return Promise.resolve(results);
  return new Promise((resolve, reject) => {
    const workers: Worker[] = [];
    const busy = new Set<Worker>();
    let next = 0, done = 0, failure: Error | undefined, settled = false;
    const stopAll = () => {
      for (const w of workers) void w.terminate();
    };
    const settleFailure = () => {
      if (!failure || settled || busy.size > 0) return;
      settled = true;
      stopAll();
      reject(failure);
    };
    const fail = (e: Error) => {
      failure ??= e;
      settleFailure();
    };
    const feed = (w: Worker) => {
      if (failure || next >= jobs.length) return;
      busy.add(w);
      w.postMessage({ i: next, job: jobs[next++] } satisfies JobMessage);
    };
    for (let t = 0; t < threads; t++) {
      const w = startWorker(module);
      workers.push(w);
      w.on('message', (m: ResultMessage) => {
        busy.delete(w);
        if (m.error !== undefined) return fail(new Error(`job ${m.i + 1} of ${jobs.length}: ${m.error}`));
        results[m.i] = m.result as R;
        opts.onResult?.(m.i, m.result as R);
        if (failure) return settleFailure();
        if (++done === jobs.length) {
          settled = true;
          stopAll();
          resolve(results);
        } else feed(w);
      });
      w.on('error', (e) => {
        busy.delete(w);
        fail(e instanceof Error ? e : new Error(String(e)));
      });
      w.on('exit', (code) => {
        busy.delete(w);
        if (done < jobs.length && !settled) fail(new Error(`a worker thread exited (code ${code}) with ${jobs.length - done} job(s) unfinished`));
      });
      feed(w);
    }
  });
}

/**
 * In the worker mapInWorkers started for moduleUrl (the caller's
 * import.meta.url): answer every job the main thread sends with handler's
 * result. Anywhere else: nothing.
 */
export function serveJobs<J, R>(moduleUrl: string, handler: (job: J) => R | Promise<R>): void {
  if (isMainThread || !parentPort || (workerData as { simJobsFor?: string } | null)?.simJobsFor !== moduleUrl) return;
  const port = parentPort;
  port.on('message', async (m: JobMessage) => {
    try {
      port.postMessage({ i: m.i, result: await handler(m.job as J) } satisfies ResultMessage);
    } catch (e) {
      port.postMessage({ i: m.i, error: e instanceof Error ? e.message : String(e) } satisfies ResultMessage);
    }
  });
}
