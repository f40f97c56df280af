D=/work/shared/data
O=/tmp/evalruns
run() { name=$1; shift; s=$(date +%s); sftmix eval --model_name_or_path smollm2-135m-instruct --output_dir $O/$name "$@" > $O/$name.log 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s load=$(cut -d' ' -f1 /proc/loadavg)" >> $O/times.txt; }
run medmcqa_letter --task medmcqa --data_path $D/medmcqa_dev/validation.jsonl --limit 300 --formulation letter
run medmcqa_cloze --task medmcqa --data_path $D/medmcqa_dev/validation.jsonl --limit 100
run pubmedqa_cloze --task pubmedqa --data_path $D/pubmedqa --limit 100
run mmlu_cloze --task mmlu_medical --data_path $D/mmlu_medical --limit 10
run ifeval --task ifeval --data_path $D/ifeval/ifeval.jsonl --limit 20 --max_new_tokens 256
