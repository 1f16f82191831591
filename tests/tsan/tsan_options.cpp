// ThreadSanitizer's defaults for the tsan executables (tests/tsan/CMakeLists.txt), read before main: the
// suppressions of oneTBB's internals (tests/tsan.supp, an absolute path compiled in), and the longest
// access history, so that both stacks of a report are restored and a suppression can match the older
// one. TSAN_OPTIONS, when set, is applied after these.
extern "C" const char* __tsan_default_options() {
  return "suppressions=" RESONANCE_TSAN_SUPPRESSIONS ":history_size=7:second_deadlock_stack=1";
}
