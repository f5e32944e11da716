"""Units of work (one external call, or one chunk of rows) and the pure logic they need.

Tasks import blocks/, never flows/.
"""
