"""Hand-made documents shared by the refinery tests."""

ENGLISH = (
    "The history of the city goes back to the Roman period, when a small settlement was founded on the bank "
    "of the river. Over the following centuries it grew into an important market town, and by the twelfth "
    "century it had a cathedral and a castle.\n\n"
    "The population increased rapidly during the industrial revolution, when mills and factories were built "
    "along the water. Today the city is known for its university, its museums and the old town with its "
    "narrow streets.\n\n"
    "Visitors come from all over the world to see the medieval walls and the famous bridge that crosses the "
    "river. In the summer there is a festival with music and theatre that lasts for two weeks."
)

CHINESE = (
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有着三千多年的建城史和八百多年的建都史，"
    "留下了大量的历史文化遗产。\n\n"
    "故宫、天坛和颐和园都是世界文化遗产，每年吸引了大量的中外游客前来参观。近年来，北京在科技创新方面也取得了很大的进步，"
    "许多高科技企业在这里设立了总部。\n\n"
    "我们在这里生活和工作，感受到了这座城市的活力和魅力。"
)

JAPANESE = (
    "東京は日本の首都であり、世界でも有数の大都市です。江戸時代には将軍の城下町として栄え、明治時代に首都となりました。"
    "現在では多くの企業の本社があり、経済の中心として重要な役割を果たしています。また、美術館や博物館も多く、"
    "文化の面でも人々を引きつけています。春には桜が咲き、多くの人が公園で花見を楽しみます。"
)
