"""Data shaped the way users' data looks, for the tests that run lmforge as a user would.

Web pages in JSONL with ids, urls and metadata, each with the boilerplate a crawl leaves
(navigation, "related articles" link blocks, copyright footers), in English and in Chinese
(technical Chinese with English terms in brackets); Chinese chat records for fine-tuning.
All text is written for these tests.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

ENGLISH_ARTICLES = [
    """Why the learning rate warmup matters

When a Transformer starts training, its weights are random and the gradients of the first steps are large and noisy. Adam's second-moment estimates are still close to zero, so the very first updates can be far bigger than the learning rate suggests. A short warmup, in which the learning rate grows linearly from zero over a few hundred steps, gives the optimizer time to collect sensible statistics before it takes full steps.

In our experiments with a six-layer model, removing the warmup made the loss spike twice in the first thousand steps, and one of the runs never recovered. With two hundred warmup steps the curve was smooth. Longer warmups did not help further; they only delayed the point where the loss started to fall quickly.

The right length depends on the batch size and the peak learning rate. As a rule of thumb, start with one or two percent of the total steps and watch the gradient norm: if it stays flat after the warmup, you are fine.""",
    """A practical guide to cleaning web text

Raw web crawls are full of text that no language model should learn from: cookie banners, menus, lists of links to other articles, and copyright lines repeated on every page of a site. Removing whole pages because of such lines throws away good content, so modern pipelines work at two levels. Line filters drop the boilerplate lines themselves, and document filters then judge what remains.

Document filters look at simple statistics. Pages made mostly of symbols, pages where the same line repeats many times, and pages with very few real sentences are usually spam or navigation pages. Language identification keeps only the languages you want, and deduplication removes near copies, which are surprisingly common on the web.

Every filter should report what it removed and why, with samples, so that you can check that the thresholds suit your data rather than someone else's.""",
    """Running a small language model on a laptop

You do not need a data center to experiment with language models. A model with a few million parameters trains in minutes on a laptop CPU and is enough to study tokenization, learning-rate schedules and sampling. The key is to keep the context short, the vocabulary modest and the batch small enough to fit in the cache.

Once trained, the model can be quantized to eight or four bits. Quantization shrinks the file several times and, on most CPUs, makes decoding faster because fewer bytes have to be read from memory for each token. The quality loss at eight bits is usually invisible; at four bits it is small if the weights are quantized in groups.

Finally, export the model to a format that other tools understand, so that you can compare your results with the rest of the ecosystem.""",
    """What a tokenizer really does

A tokenizer turns text into a sequence of integers and back again. Byte-level BPE starts from the 256 possible bytes and repeatedly merges the most frequent adjacent pair into a new token, until the vocabulary reaches the requested size. Because it starts from bytes, it can encode any text, including emoji, code and scripts it has never seen.

The vocabulary size is a trade-off. A larger vocabulary makes sequences shorter, which saves compute in attention, but every token then has fewer training examples and the embedding matrix grows. For a small model trained on a few megabytes of text, a vocabulary of a few thousand tokens works well.

Always check that decoding the encoded text gives back exactly the original string, including whitespace and unusual characters.""",
    """How continuous batching speeds up serving

A naive server answers one request at a time, so most of the machine waits while a single sequence is decoded token by token. Continuous batching keeps a running batch of sequences and adds new requests as soon as others finish, so every step of the model produces tokens for many users at once.

On a CPU the gain comes from memory bandwidth: each step has to read all the weights, and reading them once for sixteen sequences costs little more than reading them for one. The throughput therefore grows almost linearly with the number of concurrent clients, until the computation itself becomes the limit.

The price is complexity. Each sequence has its own position, its own cache and its own stopping rule, and one misbehaving request must never disturb the others in the batch.""",
    """Evaluating a model honestly

Perplexity on held-out text is the first number to look at, but it only says how well the model predicts text like its training data. Task benchmarks measure something closer to what users care about, yet they are easy to contaminate: if the test questions appear in the training corpus, the scores say little.

A careful evaluation therefore removes benchmark text from the training data, reports several tasks rather than one, and keeps the prompts and the few-shot examples fixed between the models being compared. Bits per byte are useful when comparing models with different tokenizers, because they do not depend on how the text is split.

Read the outputs, too. A table of numbers can hide a model that repeats itself or answers in the wrong language.""",
]

ENGLISH_BOILERPLATE = """Home > Blog > Machine Learning
Related articles
- Ten tips for faster training
- The best GPUs of the year
- Subscribe to our newsletter
Copyright © 2026 Example Media. All rights reserved."""

CHINESE_ARTICLES = [
    """深度学习中的学习率预热

训练 Transformer 模型时，刚开始的权重是随机的，前几步的梯度往往很大而且噪声很多。Adam 优化器（Adam optimizer）的二阶矩估计此时还接近零，所以最初的几次更新可能远远大于学习率所暗示的步长。短暂的预热（warmup）让学习率在几百步内从零线性增长，使优化器在迈出完整步伐之前先积累合理的统计量。

在一个六层模型的实验中，去掉预热后，损失在前一千步里出现了两次尖峰，其中一次训练再也没有恢复。加上两百步预热后，曲线变得平滑。更长的预热并没有进一步的帮助，只是推迟了损失快速下降的时刻。

合适的预热长度取决于批大小（batch size）和峰值学习率。经验上可以先取总步数的百分之一到百分之二，然后观察梯度范数：如果预热结束后梯度范数保持平稳，就说明设置合适。""",
    """如何清洗网页文本

原始的网页抓取数据里充满了语言模型不应该学习的内容：Cookie 提示、导航菜单、指向其他文章的链接列表，以及在网站每一页都重复出现的版权声明。如果因为这些行就删除整篇文章，会丢掉大量好的内容，所以现代的数据处理流程分两个层次工作。行级过滤器删除模板化的行，文档级过滤器再判断剩下的内容。

文档级过滤器依靠简单的统计量。主要由符号组成的页面、同一行重复很多次的页面、以及真正句子很少的页面，通常是垃圾内容或导航页。语言识别（language identification）只保留需要的语言，去重（deduplication）则删除近似的副本，而这类副本在网上出奇地常见。

每个过滤器都应该报告它删除了什么、为什么删除，并给出样例，这样你才能确认阈值适合你自己的数据。""",
    """在笔记本电脑上运行小型语言模型

研究语言模型并不一定需要数据中心。一个只有几百万参数的模型在笔记本电脑的 CPU 上几分钟就能训练完成，足以用来研究分词、学习率调度和采样方法。关键是上下文要短、词表要适中、批大小要小到可以放进缓存。

训练完成后，可以把模型量化（quantization）到八位或四位。量化能把文件缩小好几倍，而且在大多数 CPU 上还能加快解码速度，因为每生成一个词元需要从内存读取的字节更少了。八位量化的质量损失通常察觉不到；四位量化如果按分组进行，损失也很小。

最后，把模型导出为其他工具能够读取的格式，例如 GGUF 或 ONNX，这样就可以把结果和整个生态中的其他工具进行比较。""",
    """分词器到底做了什么

分词器（tokenizer）把文本变成整数序列，也能把整数序列还原成文本。字节级 BPE 从 256 个可能的字节出发，反复把最常见的相邻字节对合并成新的词元，直到词表达到指定的大小。因为它从字节开始，所以能够编码任何文本，包括表情符号、代码和从未见过的文字。

词表大小是一种权衡。更大的词表让序列更短，可以节省注意力（attention）的计算量，但每个词元得到的训练样本更少，嵌入矩阵也会变大。对于在几兆字节文本上训练的小模型，几千个词元的词表效果就很好。

一定要检查：把编码后的文本再解码，应该得到与原文完全相同的字符串，包括空白和不常见的字符。""",
    """连续批处理如何加快推理服务

朴素的服务器一次只回答一个请求，在逐个词元解码一个序列的时候，机器的大部分能力都在等待。连续批处理（continuous batching）维护一个正在运行的序列批次，一旦有序列完成就立即加入新的请求，因此模型的每一步都能同时为很多用户生成词元。

在 CPU 上，收益来自内存带宽：每一步都要读取全部权重，而为十六个序列读取一次权重，代价只比为一个序列读取略高一点。因此吞吐量几乎随并发客户端的数量线性增长，直到计算本身成为瓶颈。

代价是复杂性。每个序列都有自己的位置、自己的缓存和自己的停止规则，而且一个出问题的请求绝不能影响批次中的其他请求。""",
    """如何诚实地评估模型

在留出文本上的困惑度（perplexity）是首先要看的数字，但它只说明模型预测类似训练数据的文本的能力。任务基准测试更接近用户关心的东西，却很容易被污染：如果测试题出现在训练语料里，分数就说明不了什么。

因此，认真的评估会从训练数据中删除基准测试的文本，报告多个任务而不是一个，并且在比较不同模型时保持提示词和少样本示例不变。在比较使用不同分词器的模型时，每字节比特数（bits per byte）很有用，因为它不依赖于文本的切分方式。

还要亲自阅读模型的输出。一张数字表格可能掩盖一个不断重复自己、或者用错误语言回答的模型。""",
]

CHINESE_BOILERPLATE = """首页 > 技术 > 人工智能
相关文章
- 十个让训练更快的技巧
- 今年最值得买的显卡
- 点击订阅我们的周刊
版权所有 © 2026 示例科技 保留所有权利"""

CHINESE_CHAT = [
    ("什么是学习率预热？", "学习率预热是在训练开始的几百步内，让学习率从零逐渐增加到峰值，帮助优化器稳定下来。"),
    ("为什么要对模型进行量化？", "量化可以把模型文件缩小好几倍，并且在 CPU 上通常能加快解码速度。"),
    ("分词器的作用是什么？", "分词器把文本转换成整数序列，也能把整数序列还原成原来的文本。"),
    ("什么是连续批处理？", "连续批处理让服务器在同一步里为多个请求生成词元，从而提高吞吐量。"),
    ("怎样评估一个语言模型？", "可以先看留出文本上的困惑度，再看多个任务基准的结果，并亲自阅读模型的输出。"),
    ("为什么要清洗网页文本？", "网页里有导航菜单、链接列表和版权声明，这些内容不应该让模型学习。"),
    ("什么是 GGUF 格式？", "GGUF 是 llama.cpp 使用的模型文件格式，可以保存量化后的权重。"),
    ("小模型能在笔记本上训练吗？", "可以，几百万参数的模型在笔记本电脑的 CPU 上几分钟就能训练完成。"),
]


def web_records() -> list[dict]:
    """Web pages as a crawler's JSONL holds them: id, url, source, metadata and text with a boilerplate tail."""
    records = []
    for i, body in enumerate(ENGLISH_ARTICLES):
        records.append({"id": f"en-{i:04d}", "url": f"https://blog.example.com/posts/{i}", "source": "crawl-2026-10",
                        "meta": {"lang_hint": "en", "fetched": "2026-10-0%d" % (1 + i % 9)},
                        "text": f"{body}\n\n{ENGLISH_BOILERPLATE}"})
    for i, body in enumerate(CHINESE_ARTICLES):
        records.append({"id": f"zh-{i:04d}", "url": f"https://tech.example.cn/a/{1000 + i}.html", "source": "crawl-2026-10",
                        "meta": {"lang_hint": "zh", "fetched": "2026-10-1%d" % (i % 9)},
                        "text": f"{body}\n\n{CHINESE_BOILERPLATE}"})
    return records


def write_web_jsonl_gz(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in web_records():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def chinese_chat_records(repeat: int = 1) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _ in range(repeat) for q, a in CHINESE_CHAT]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
