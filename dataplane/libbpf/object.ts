/** BPF objects: open, load, find their programs and maps, close. */
import koffi from 'koffi';
import { E, LibbpfError, check } from './errors.ts';
import { BpfMap } from './map.ts';
import { native, STRUCT_SIZES, withLibbpfLog, type Ptr } from './native.ts';
import { BpfProgram } from './program.ts';

/** What most likely went wrong in a failed bpf_object__load, judged from libbpf's log. */
function loadHint(errno: number, log: string, failedProgram: string | undefined): string | undefined {
  if (log.includes("couldn't reuse pinned map")) {
    return 'a map pinned at the pin path differs in type, key/value size, max_entries or flags: unpin it, or fix the declaration';
  }
  if (log.includes('-- BEGIN PROG LOAD LOG --') || errno === 4000 + 7) {
    return `the verifier rejected program '${failedProgram ?? '?'}'; the tail of its log follows`;
  }
  if (errno === E.EPERM) return 'are you root with CAP_BPF?';
  return failedProgram ? `program '${failedProgram}' failed to load` : undefined;
}

export class BpfObject {
  private ptr: Ptr | null;
  private loaded = false;
  private loadTried = false;

  private constructor(readonly path: string, ptr: Ptr) {
    this.ptr = ptr;
  }

  /**
   * bpf_object__open_file. pinRoot is where maps declared with
   * `__uint(pinning, LIBBPF_PIN_BY_NAME)` are pinned, and reused from, on load
   * (libbpf's default is /sys/fs/bpf).
   */
  static open(path: string, opts: { pinRoot?: string } = {}): BpfObject {
    const n = native();
    const o = {
      sz: STRUCT_SIZES.bpf_object_open_opts,
      object_name: null, relaxed_maps: false, pin_root_path: opts.pinRoot ?? null, removed_attach_prog_fd: 0,
      kconfig: null, btf_custom_path: null, kernel_log_buf: null, kernel_log_size: 0, kernel_log_level: 0,
    };
    const { result, log } = withLibbpfLog(() => {
      const p = n.bpf_object__open_file(path, o);
      // Read errno before any other native call can overwrite it.
      return { p, errno: p ? 0 : koffi.errno() };
    });
    if (!result.p) {
      throw new LibbpfError(`open of ${path}`, result.errno || E.EINVAL, {
        [E.ENOENT]: 'no such file: build the object first',
        [4000 + 1]: 'not a BPF ELF object (compile with clang -target bpf -g)',
        [E.EINVAL]: 'libbpf could not parse the object (see its log)',
      }[result.errno], log);
    }
    return new BpfObject(path, result.p);
  }

  private handle(): Ptr {
    if (this.ptr === null) throw new Error(`BPF object ${this.path} is closed`);
    return this.ptr;
  }

  /** Whether load() succeeded. */
  get isLoaded(): boolean {
    return this.loaded;
  }

  private programPtrs(): Array<[string, Ptr]> {
    const n = native();
    const out: Array<[string, Ptr]> = [];
    for (let p = n.bpf_object__next_program(this.handle(), null); p; p = n.bpf_object__next_program(this.handle(), p)) {
      out.push([n.bpf_program__name(p), p]);
    }
    return out;
  }

  private mapPtrs(): Array<[string, Ptr]> {
    const n = native();
    const out: Array<[string, Ptr]> = [];
    for (let m = n.bpf_object__next_map(this.handle(), null); m; m = n.bpf_object__next_map(this.handle(), m)) {
      out.push([n.bpf_map__name(m), m]);
    }
    return out;
  }

  programs(): string[] {
    return this.programPtrs().map(([name]) => name);
  }

  /** Each program's ELF section (SEC("tc") gives 'tc'), by program name; needs no privilege. */
  programSections(): Record<string, string> {
    const n = native();
    return Object.fromEntries(this.programPtrs().map(([name, p]) => [name, n.bpf_program__section_name(p)]));
  }

  /** Includes libbpf's internal maps (.bss, .data, .rodata) when the object has globals. */
  maps(): string[] {
    return this.mapPtrs().map(([name]) => name);
  }

  private findProgram(name: string): Ptr {
    const all = this.programPtrs();
    const hit = all.find(([n]) => n === name);
    if (!hit) throw new Error(`no program '${name}' in ${this.path}; it has: ${all.map(([n]) => n).join(', ') || '(none)'}`);
    return hit[1];
  }

  /** Must come before load(); a program not loaded has no fd. */
  setAutoload(program: string, on: boolean): void {
    const p = this.findProgram(program);
    if (this.loadTried) throw new Error(`setting autoload of program '${program}' in ${this.path}: load() was already called; call setAutoload before it`);
    check(`setting autoload of program '${program}' in ${this.path}`, () => native().bpf_program__set_autoload(p, on));
  }

  /** bpf_object__load: creates the maps and runs every autoloaded program through the verifier. */
  load(): void {
    const h = this.handle();
    // libbpf marks the object loaded even when loading fails, and refuses a second try.
    if (this.loadTried) throw new Error(`BPF object ${this.path}: load() was already called${this.loaded ? '' : ' and failed'}; open the file again to retry`);
    this.loadTried = true;
    const { result, log } = withLibbpfLog(() => native().bpf_object__load(h));
    if (result < 0) {
      const errno = -result;
      const failed = /prog '([^']+)': (?:BPF program load failed|failed to load)/.exec(log)?.[1];
      const hint = loadHint(errno, log, failed);
      throw new LibbpfError(`load of ${this.path}`, errno, hint, log);
    }
    this.loaded = true;
  }

  program(name: string): BpfProgram {
    return new BpfProgram(this, name, this.findProgram(name));
  }

  map(name: string): BpfMap {
    const all = this.mapPtrs();
    const hit = all.find(([n]) => n === name);
    if (!hit) throw new Error(`no map '${name}' in ${this.path}; it has: ${all.map(([n]) => n).join(', ') || '(none)'}`);
    return BpfMap.fromObject(this, name, hit[1]);
  }

  /** bpf_object__close; closes every map and program fd the object owns. Idempotent. */
  close(): void {
    if (this.ptr === null) return;
    native().bpf_object__close(this.ptr);
    this.ptr = null;
  }

  /** @internal BpfMap uses this to refuse settings that only load() reads. */
  assertNotLoaded(what: string): void {
    this.assertOpen(what);
    if (this.loadTried) throw new Error(`${what} must come before load()`);
  }

  /** @internal BpfMap/BpfProgram use this to refuse work on a closed object. */
  assertOpen(what: string): void {
    if (this.ptr === null) throw new Error(`${what} cannot be used: the object was closed`);
  }
}
