export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:$PYTHONPATH
for q in bf16 fp8; do
  flag=$([ $q = fp8 ] && echo "--quantization fp8")
  timeout 120 python3 benchmarks/probes/probe_step_host.py --config mistral-small-2501 $flag 2>&1 | grep -v -i warn | tee $OUT/host_$q.log | tail -12
  timeout 170 python3 benchmarks/bench_speculative.py gpu --skip-steps --config mistral-small-2501 $flag --out $OUT/e2e_$q.json 2>&1 | grep -v -i warn | tee $OUT/e2e_$q.log | tail -6
done
